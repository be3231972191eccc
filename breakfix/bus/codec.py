"""Decoders from wire bytes to contract models, raising ``DecodeError`` with a clear reason.

A ``DecodeError`` sends the message to the dead-letter subject (see ``bus.consumer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from breakfix.bus.consumer import DecodeError
from breakfix.schemas.common import first_error

M = TypeVar("M", bound=BaseModel)


def decoder(model: type[M]) -> Callable[[bytes], M]:
    def decode(data: bytes) -> M:
        try:
            return model.model_validate_json(data)
        except ValidationError as exc:
            raise DecodeError(f"invalid {model.__name__}: {first_error(exc)}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"undecodable {model.__name__}: {exc}") from None

    decode.__name__ = f"decode_{model.__name__}"
    return decode


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()
