"""The published form of the contract: JSON Schema and an AsyncAPI document.

Other services subscribe to these events; this is what they code against.
"""

from typing import Any

from pydantic import BaseModel

from contracts import commands, replies, subjects
from contracts.envelope import Envelope
from contracts.events import EVENT_TYPES

ASYNCAPI_VERSION = "3.0.0"

# Request/reply subjects: the command each carries and the reply it gets.
COMMANDS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    subjects.ADD_CREDENTIAL: (commands.AddCredential, replies.CredentialReply),
    subjects.UPDATE_CREDENTIAL: (commands.UpdateCredential, replies.CredentialReply),
    subjects.DELETE_CREDENTIAL: (commands.DeleteCredential, replies.CredentialReply),
    subjects.ATTACH_CREDENTIAL: (commands.AttachCredential, replies.CredentialReply),
    subjects.DETACH_CREDENTIAL: (commands.DetachCredential, replies.CredentialReply),
    subjects.RESOLVE_CREDENTIAL: (
        commands.ResolveCredential,
        replies.ResolvedCredential,
    ),
    subjects.VERIFY_CREDENTIAL: (commands.VerifyCredential, replies.Verification),
    subjects.CHECK_IMAGE: (commands.CheckImage, replies.ImageCheck),
    subjects.CREATE_APP: (commands.CreateApp, replies.AppReply),
    subjects.CHANGE_APP_CREDENTIAL: (commands.ChangeAppCredential, replies.AppReply),
    subjects.DELETE_APP: (commands.DeleteApp, replies.AppReply),
    subjects.REDEPLOY_APP: (commands.RedeployApp, replies.AppReply),
}

# Event subjects, one per aggregate type; the id is the last token.
EVENT_CHANNELS = {
    "credential": "Registry credentials: added, updated, attached, deleted.",
    "app": "App VMs and their deploys, stage by stage.",
    "app_name": "Which App holds a name within an account.",
    "account": "Accounts of the platform.",
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every event, command, reply and the envelope, by model name."""
    models: list[type[BaseModel]] = [Envelope, *EVENT_TYPES.values()]
    for command, reply in COMMANDS.values():
        models.extend((command, reply))
    return {model.__name__: model.model_json_schema() for model in models}


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3 document of the event subjects and the commands."""
    schemas = json_schemas()
    messages = {
        name: {"name": name, "payload": {"$ref": f"#/components/schemas/{name}"}}
        for name in schemas
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for kind, description in EVENT_CHANNELS.items():
        key = f"{kind}_events"
        channels[key] = {
            "address": subjects.aggregate_subject(kind, "{id}"),
            "description": description + " Payload: Envelope; data by type.",
            "parameters": {"id": {"description": f"The {kind}'s id."}},
            "messages": {"Envelope": {"$ref": "#/components/messages/Envelope"}},
        }
        operations[f"receive_{key}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
        }
    for subject, (command, reply) in COMMANDS.items():
        key = subject.replace(".", "_")
        channels[key] = {
            "address": subject,
            "messages": {
                command.__name__: {"$ref": f"#/components/messages/{command.__name__}"},
                reply.__name__: {"$ref": f"#/components/messages/{reply.__name__}"},
            },
        }
        operations[key] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{command.__name__}"}],
            "reply": {
                "messages": [{"$ref": f"#/channels/{key}/messages/{reply.__name__}"}]
            },
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "CrabGlamp events and commands",
            "version": "1",
            "description": f"Events live on JetStream stream {subjects.EVENT_STREAM}.",
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
