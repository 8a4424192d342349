"""profiles.email: the email a user signed up with, for support to find them by (revision 0009, after 0008,
2026-11-28)"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.add_column("profiles", sa.Column("email", sa.Text(), nullable=True))
    op.create_index(op.f("ix_profiles_email"), "profiles", ["email"], unique=False)
    # On Supabase, the existing profiles get their users' emails from auth.users (elsewhere there is none to copy).
    op.execute(
        """
        DO $$
        BEGIN
            IF to_regclass('auth.users') IS NOT NULL THEN
                IF has_table_privilege('auth.users', 'SELECT') THEN
                    EXECUTE 'UPDATE public.profiles p SET email = lower(u.email) FROM auth.users u '
                            'WHERE u.id = p.id AND p.email IS NULL AND u.email IS NOT NULL';
                END IF;
            END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_profiles_email"), table_name="profiles")
    op.drop_column("profiles", "email")
