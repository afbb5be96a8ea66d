"""Training, evaluation and generation of the GPT: ``zerotrain train | eval | generate``."""
