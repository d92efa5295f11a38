"""Drops one import-time log line: torchao 0.18 registers its KernelPreference enum in a
way torch 2.14 logs as deprecated on every import, a line nobody using esc-ao can act on,
which stood before every error message of the CLI. Nothing else is filtered."""

from __future__ import annotations

import logging


class _DropKernelPreferenceNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "KernelPreference" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_DropKernelPreferenceNotice())
