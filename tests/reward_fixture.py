"""A reward for tests: varies with the response, so that advantages are non-zero even for a random model."""


def even_length(response: str, answer: str) -> float:
    return float(len(response) % 2 == 0)
