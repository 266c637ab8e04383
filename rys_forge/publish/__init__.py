"""publish: the model card of an export and its verified upload to the Hub.

`card.py` renders the card (`sections.py` builds its sections, `numbers.py` writes its numbers and counts
parameters) and runs `publish`; `hub.py` talks to the Hub (token, upload, confirmation).
"""

from rys_forge.publish.card import format_result, publish, render_card, write_card

__all__ = ["format_result", "publish", "render_card", "write_card"]
