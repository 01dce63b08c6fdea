"""The command line's environment, set before any library reads it: no model or data hub is asked for anything
(every model is a local folder), and the libraries' own progress bars and chatter are off (unison prints its own).
A setting already in the environment is kept."""

import os

ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

for key, value in ENVIRONMENT.items():
    os.environ.setdefault(key, value)
