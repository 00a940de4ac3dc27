"""NVIDIA DALI backend (placeholder until the DALI issue lands)."""


def available() -> bool:
    return False


def import_error() -> str:
    return "not implemented yet"
