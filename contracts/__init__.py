"""The published contract of the CrabGlamp suite: commands, replies, events.

Everything here is a pydantic model or a constant. No I/O, no service imports.
"""
