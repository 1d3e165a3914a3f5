"""Domain errors. Each subclasses the matching builtin and says what to do about it.

ForecasterError
 +-- ConfigError (ValueError)          a setting is wrong: names the key and the fix
 +-- CheckpointError (ValueError)      a checkpoint file is missing, altered or unreadable
 +-- SourceError (RuntimeError)        a source could not be read (network, file, query)
 +-- StoreError (RuntimeError)         the SQL store refused or is unreachable
 |    +-- SchemaOutOfDateError         the database is not at the migrations' head
 +-- UnknownSeriesError (LookupError)  a series name is not in the store
 +-- UnknownSourceError (LookupError)  a source name is not in the config
 +-- UnknownModelVersionError (LookupError)  a model version id is not in the registry
"""

from __future__ import annotations

from forecaster.masking import mask_secrets


class ForecasterError(Exception):
    """Base of every error this package raises on purpose. Its message is printed to users
    and logged, so it is masked when built: a URL's password, a configured token."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(mask_secrets(a) if isinstance(a, str) else a for a in args))


class ConfigError(ForecasterError, ValueError):
    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        super().__init__(f"config key {key!r}: {problem}. {fix}")


class CheckpointError(ForecasterError, ValueError):
    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        super().__init__(f"checkpoint {where}: {problem}")


class SourceError(ForecasterError, RuntimeError):
    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        super().__init__(f"source {source!r}: {problem}")


class StoreError(ForecasterError, RuntimeError):
    pass


class SchemaOutOfDateError(StoreError):
    def __init__(self, current: str | None, head: str) -> None:
        self.current, self.head = current, head
        super().__init__(
            f"the database schema is at revision {current or 'none (empty database)'}, "
            f"the code expects {head}. Run `forecaster db upgrade` first."
        )


class UnknownSeriesError(ForecasterError, LookupError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"no series named {name!r} in the store; `forecaster series list` shows them"
        )


class UnknownSourceError(ForecasterError, LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        listed = ", ".join(sorted(known)) or "none configured"
        super().__init__(f"no source named {name!r} in the config (known: {listed})")


class UnknownModelVersionError(ForecasterError, LookupError):
    def __init__(self, version_id: int) -> None:
        self.version_id = version_id
        super().__init__(
            f"no model version {version_id} in the registry; `forecaster models list` shows them"
        )
