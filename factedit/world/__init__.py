"""The synthetic world of facts that the embedded demo model is trained on."""

from factedit.world.generate import Entity, Relation, World, generate_world

__all__ = ["Entity", "Relation", "World", "generate_world"]
