"""NATS subject names and the event stream's name."""

from typing import Final

EVENT_STREAM: Final = "CRABGLAMP_EVENTS"
EVENTS_PREFIX: Final = "crabglamp.events"
EVENTS_ALL: Final = f"{EVENTS_PREFIX}.>"

CREDENTIAL_KEYS_BUCKET: Final = "crabglamp_credential_keys"

ADD_CREDENTIAL: Final = "crabglamp.cmd.credentials.add"
UPDATE_CREDENTIAL: Final = "crabglamp.cmd.credentials.update"
DELETE_CREDENTIAL: Final = "crabglamp.cmd.credentials.delete"
ATTACH_CREDENTIAL: Final = "crabglamp.cmd.credentials.attach"
DETACH_CREDENTIAL: Final = "crabglamp.cmd.credentials.detach"
RESOLVE_CREDENTIAL: Final = "crabglamp.cmd.credentials.resolve"
CREATE_ACCOUNT: Final = "crabglamp.cmd.accounts.create"

VERIFY_CREDENTIAL: Final = "crabglamp.cmd.verifier.verify"
CHECK_IMAGE: Final = "crabglamp.cmd.verifier.check_image"

CREATE_APP: Final = "crabglamp.cmd.apps.create"
CHANGE_APP_CREDENTIAL: Final = "crabglamp.cmd.apps.change_credential"
DELETE_APP: Final = "crabglamp.cmd.apps.delete"
REDEPLOY_APP: Final = "crabglamp.cmd.apps.redeploy"


def aggregate_subject(aggregate_type: str, aggregate_id: str) -> str:
    """The subject that holds every event of one aggregate instance."""
    return f"{EVENTS_PREFIX}.{aggregate_type}.{aggregate_id}"
