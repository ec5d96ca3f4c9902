"""Grounding: LVLM attention maps as Segment Anything prompts."""
