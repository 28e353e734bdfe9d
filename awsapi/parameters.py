"""The readiness record in Parameter Store, under the environment's path."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from awsapi.clients import AwsError, call, client
from core.record import ReadinessRecord
from core.settings import Settings


def write_record(settings: Settings, record: ReadinessRecord) -> None:
    """Store the readiness record where `pulumi up` reads it."""
    put_record_text(settings, record.to_json())


def put_record_text(settings: Settings, text: str) -> None:
    ssm = client(settings, "ssm")
    call(f"ssm put-parameter {settings.parameter_path}", ssm.put_parameter,
         Name=settings.parameter_path, Value=text, Type="String", Overwrite=True,
         Tier="Standard" if len(text) <= 4096 else "Advanced",
         Description=f"wsgate {settings.env}: hosts proven ready for the PROXY protocol (written by fab rollout)")


def read_record_text(settings: Settings) -> str | None:
    """The stored record as it is (None: there is none)."""
    ssm = client(settings, "ssm")
    try:
        return ssm.get_parameter(Name=settings.parameter_path)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm get-parameter {settings.parameter_path}: {exc}") from None


def read_record(settings: Settings) -> ReadinessRecord | None:
    text = read_record_text(settings)
    return None if text is None else ReadinessRecord.from_json(text)


def delete_record(settings: Settings) -> None:
    ssm = client(settings, "ssm")
    try:
        ssm.delete_parameter(Name=settings.parameter_path)
    except ssm.exceptions.ParameterNotFound:
        pass
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm delete-parameter {settings.parameter_path}: {exc}") from None
