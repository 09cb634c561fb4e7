"""A dense toy reward for GRPO loop tests: the share of digits in the completion (random models get a spread)."""


def digit_share(prompts, completions, **_):
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]
