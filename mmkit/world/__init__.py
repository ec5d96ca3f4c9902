"""The reference world: procedurally generated scenes with exact truth, and questions about them.

`scenes` generates seeded images with per-object category, colour, box and visible mask, with COCO-like category
statistics; `questions` builds POPE, VQA, caption and grounding sets and the instruction-tuning stream; `vocab`
extracts category mentions from free text (CHAIR) and lists every word of the world.
"""
