"""mtbench: one interface, one backbone and decoder, one measurement protocol for multi-task PEFT in dense vision."""

__version__ = "0.1.0"
