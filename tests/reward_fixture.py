"""A reward for tests: varies with the response, so that advantages are non-zero even for a random model."""


def even_length(response: str, answer: str) -> float:
    return float(len(response) % 2 == 0)


def raises(response: str, answer: str) -> float:
    raise ZeroDivisionError("division by zero")


def huge(response: str, answer: str) -> float:
    return 1e300  # finite in Python, inf in fp32


def not_a_number(response: str, answer: str):
    return "yes"
