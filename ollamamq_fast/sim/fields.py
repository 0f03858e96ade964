"""Reading request fields with Ollama's validation rules and error texts."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from .gojson import BodyError, type_error

THINK_LEVELS = ("low", "medium", "high", "max")
_NOT_BASE64_RE = re.compile(r"[^A-Za-z0-9+/=]")


def check_top_logprobs(req: dict[str, Any]) -> None:
    """top_logprobs must be 0..20 (generate and chat)."""
    value = req.get("top_logprobs")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 20:
        raise BodyError("top_logprobs must be between 0 and 20")


def go_quote(text: str) -> str:
    """Go's %q for ordinary strings."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_think(value: Any) -> bool:
    """api.ThinkValue: bool or a level; sim choice: absent means no thinking output."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in THINK_LEVELS:
            return True
        raise BodyError(f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)')
    raise BodyError("think must be a boolean or string")


def check_images(images: Any, struct: str) -> None:
    """[]api.ImageData: standard base64 strings, else Go's base64 error."""
    if images is None:
        return
    if not isinstance(images, list):
        raise type_error(images, struct, "images", "[]api.ImageData")
    for image in images:
        if not isinstance(image, str):
            raise type_error(image, struct, "images", "api.ImageData")
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            bad = _NOT_BASE64_RE.search(image)
            offset = bad.start() if bad else len(image) - len(image) % 4
            raise BodyError(f"illegal base64 data at input byte {offset}") from None


def options_of(req: dict[str, Any], struct: str) -> dict[str, Any]:
    """`options` object (absent or null is empty)."""
    options = req.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise type_error(options, struct, "options", "map[string]interface {}")
    return options


def seed_of(options: dict[str, Any]) -> int:
    """options.seed, 0 when absent (output is deterministic either way)."""
    seed = options.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def message_text(message: Any) -> str:
    """The text of a chat message, whatever shape its content has."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def conversation_text(messages: list[Any]) -> str:
    """All message texts joined: the "prompt" that seeds the answer and counts tokens."""
    return "\n".join(message_text(m) for m in messages)


def last_user_text(messages: list[Any]) -> str | None:
    """The last message's text if it comes from the user (the tool-call trigger looks here)."""
    if not messages:
        return None
    last = messages[-1]
    if isinstance(last, dict) and str(last.get("role", "")).lower() == "user":
        return message_text(last)
    return None
