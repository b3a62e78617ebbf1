"""Orchestration: chains of stages written in one place (the checkpoint sweep).

Stages never call each other; a flow runs several of them in order.
"""

from __future__ import annotations

STAGES: list = []
