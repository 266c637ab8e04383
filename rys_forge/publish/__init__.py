"""publish: the model card of an export and its upload to the Hub, gated on verification."""

from rys_forge.publish.card import format_result, publish, write_card

__all__ = ["format_result", "publish", "write_card"]
