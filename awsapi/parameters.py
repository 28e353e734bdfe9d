"""The readiness record in Parameter Store, under the environment's path.

Its wire form (one parameter, or a manifest and its shards) is core.record's; here are only the
calls. A write puts the shards first and the manifest last; a delete takes the manifest first:
whoever reads in between finds the old record, or no valid one, never half of one.
"""

from __future__ import annotations

from collections.abc import Mapping

from botocore.exceptions import BotoCoreError, ClientError

from awsapi.clients import aws_error, call, chunks, client
from core import record as records
from core.move import MoveRecord, move_path
from core.record import ReadinessRecord, RecordError
from core.settings import Settings

BATCH = 10  # names per GetParameters and DeleteParameters call (the API's own limit)


def read_stored(settings: Settings) -> dict[str, str]:
    """The record's parameters as they are now (name -> value; empty: there is none): the value at
    the path, and the shards its manifest names (those missing are left out: the reader says so)."""
    text = read_record_text(settings)
    if text is None:
        return {}
    found = {settings.parameter_path: text}
    names = records.shards_named(text, settings.parameter_path)
    ssm = client(settings, "ssm")
    for batch in chunks(names, BATCH):
        got = call(f"ssm get-parameters {settings.parameter_path}.*", ssm.get_parameters, Names=batch,
                   WithDecryption=False)
        found.update({p["Name"]: p["Value"] for p in got["Parameters"]})
    return found


def read_checked(settings: Settings) -> tuple[ReadinessRecord | None, str | None]:
    """The stored record, or None and why (core.record.decode: the reader the program uses too)."""
    return records.decode(read_stored(settings), settings.parameter_path)


def read_record(settings: Settings) -> ReadinessRecord | None:
    """The stored record; None when there is none; RecordError when what is there proves nothing."""
    found = read_stored(settings)
    record, problem = records.decode(found, settings.parameter_path)
    if problem and found:
        raise RecordError(problem)
    return record


def read_record_text(settings: Settings) -> str | None:
    """The value at the record's path as it is (the record, or its manifest; None: there is none)."""
    ssm = client(settings, "ssm")
    try:
        return ssm.get_parameter(Name=settings.parameter_path)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    except (ClientError, BotoCoreError) as exc:
        raise aws_error(f"ssm get-parameter {settings.parameter_path}", exc) from None


def write_record(settings: Settings, record: ReadinessRecord) -> None:
    """Store the readiness record where `pulumi up` reads it."""
    put(settings, records.encode(record, settings.parameter_path), read_stored(settings))


def put_shards(settings: Settings, params: Mapping[str, str], old: Mapping[str, str]) -> list[str]:
    """Write the shards of `params` that `old` lacks (they prove nothing until a manifest names
    them); the names written."""
    ssm = client(settings, "ssm")
    written = []
    for name, value in params.items():
        if name != settings.parameter_path and old.get(name) != value:
            call(f"ssm put-parameter {name}", ssm.put_parameter, Name=name, Value=value, Type="String",
                 Overwrite=True, Tier="Standard",
                 Description=f"wsgate {settings.env}: a shard of the readiness record {settings.parameter_path}")
            written.append(name)
    return written


def put(settings: Settings, params: Mapping[str, str], old: Mapping[str, str]) -> None:
    """Make the stored record `params` where it is `old` now: shards, then the value at the path
    (the manifest: written last), then the shards only `old` had."""
    path = settings.parameter_path
    put_shards(settings, params, old)
    if old.get(path) != params[path]:
        text = params[path]
        # Intelligent-Tiering: a value an older kit wrote as an advanced parameter cannot go back to standard
        call(f"ssm put-parameter {path}", client(settings, "ssm").put_parameter, Name=path, Value=text,
             Type="String", Overwrite=True, Tier="Intelligent-Tiering",
             Description=f"wsgate {settings.env}: hosts proven ready for the PROXY protocol (written by fab rollout)")
    remove(settings, [n for n in old if n not in params])


def delete(settings: Settings, old: Mapping[str, str]) -> None:
    """No record: the value at the path first (the proof is gone at once), then its shards."""
    path = settings.parameter_path
    if path in old:
        remove(settings, [path])
    remove(settings, [n for n in old if n != path])


def delete_record(settings: Settings) -> None:
    delete(settings, read_stored(settings) or {settings.parameter_path: ""})


def remove(settings: Settings, names: list[str]) -> None:
    """Delete these parameters (one missing already is fine)."""
    ssm = client(settings, "ssm")
    for batch in chunks(sorted(names), BATCH):
        if len(batch) == 1:
            try:
                ssm.delete_parameter(Name=batch[0])
            except ssm.exceptions.ParameterNotFound:
                pass
            except (ClientError, BotoCoreError) as exc:
                raise aws_error(f"ssm delete-parameter {batch[0]}", exc) from None
        else:
            call(f"ssm delete-parameters {batch[0]} and {len(batch) - 1} more", ssm.delete_parameters, Names=batch)


def read_move(settings: Settings) -> MoveRecord | None:
    """The move record (core.move), or None when no move was started."""
    path = move_path(settings)
    ssm = client(settings, "ssm")
    try:
        text = ssm.get_parameter(Name=path)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    except (ClientError, BotoCoreError) as exc:
        raise aws_error(f"ssm get-parameter {path}", exc) from None
    return MoveRecord.from_json(text, path)


def write_move(settings: Settings, record: MoveRecord) -> None:
    """Store the move record where `pulumi up` and the next `fab move` read it."""
    path = move_path(settings)
    call(f"ssm put-parameter {path}", client(settings, "ssm").put_parameter, Name=path, Value=record.to_json(),
         Type="String", Overwrite=True, Tier="Standard",
         Description=f"wsgate {settings.env}: a move between load balancers (written by fab move)")


def delete_move(settings: Settings) -> None:
    remove(settings, [move_path(settings)])
