"""signup grants all carry the reference 'signup': the API wrote none where the auth.users trigger wrote it
(revision 0005, after 0004, 2026-11-28)"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    # The values of app.services.profiles.SIGNUP_REFERENCE and SIGNUP_NOTE when this was written.
    op.execute(
        "UPDATE credit_entries SET reference = 'signup', note = coalesce(note, 'signup grant') "
        "WHERE kind = 'signup_grant' AND reference IS NULL"
    )


def downgrade() -> None:
    pass  # both forms are valid signup grants; nothing to undo
