"""The dataset doctor behind `lora-scripts check-data`.

Image sets: `check_image_dataset(index_image_dataset(...), resolution)` -> Report;
`fix_dataset(index, report, max_side=...)` applies the safe fixes. LLM sets: `check_text_samples`.
A Report renders as `format_terminal()`, `to_json()` or `write_html(path)`; `has_blocking` gives
the exit code.
"""

from lora_scripts.datacheck.doctor import check_image_dataset
from lora_scripts.datacheck.fix import FixSummary, fix_dataset
from lora_scripts.datacheck.image_checks import ImageCheckSettings
from lora_scripts.datacheck.report import Finding, Report
from lora_scripts.datacheck.text_checks import PromptResponse, check_text_samples

__all__ = [
    "Finding",
    "FixSummary",
    "ImageCheckSettings",
    "PromptResponse",
    "Report",
    "check_image_dataset",
    "check_text_samples",
    "fix_dataset",
]
