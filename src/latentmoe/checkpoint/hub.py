"""A checkpoint named by a local directory or a hub model id (`deepseek-ai/DeepSeek-V2-Lite`), as one local directory.

Hub ids go through huggingface_hub's own cache, so everything it honours applies: `HF_HOME` / `HF_HUB_CACHE`,
`HF_HUB_OFFLINE=1`, `HF_TOKEN`, a `revision` (branch, tag or commit). Only the files a checkpoint directory is
made of are fetched (config, safetensors weights and their index, tokenizer files): a repository's `.bin`
duplicates, modelling code and images stay on the hub. Every failure (offline and not cached, unknown id,
gated or private repository, unknown revision) becomes one `FileNotFoundError` line that says what to do.
"""

from __future__ import annotations

import os
import re

# What a checkpoint directory is made of (see checkpoint.hf): nothing else is downloaded.
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"]
# `name` or `owner/name` with the hub's characters; anything else (two slashes, ./, ~) is only ever a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith(".") and ".." not in name


def resolve_checkpoint(name: str | os.PathLike, revision: str | None = None, progress: bool = True,
                       patterns: list[str] | None = None) -> str:
    """The local checkpoint directory for `name`: the directory itself, or the hub id's snapshot in the cache
    (downloaded when missing, with a progress bar unless `progress` is False; only `patterns`, by default the
    files of a checkpoint directory; ["config.json"] for the config alone)."""
    name = os.fspath(name)
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"--revision applies to hub model ids, but {name!r} is a local directory")
        return name
    if not is_hub_id(name):
        raise FileNotFoundError(f"checkpoint directory not found: {name}")
    return _download(name, revision, progress, patterns or HUB_PATTERNS)


def _download(repo_id: str, revision: str | None, progress: bool, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    at = f" at revision {revision!r}" if revision else ""
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    # The order matters: a gated repo is a not-found error, and both (and a bad revision) are HTTP errors.
    except GatedRepoError:
        raise FileNotFoundError(f"{repo_id} is a gated model: accept its terms on the hub, then log in "
                                f"(`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no directory {repo_id!r} here and no model {repo_id!r} on the hub "
                                f"(or it is private: log in or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"no directory {repo_id!r} here, and hub model {repo_id}{at} is not (completely) in "
                                f"the hub cache while the hub cannot be reached (HF_HUB_OFFLINE=1 or no network): "
                                f"download it once online, or give a checkpoint directory") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"could not fetch {repo_id}{at} from the hub: {str(e).splitlines()[0]}") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{repo_id}{at} has no config.json: not an HF-format checkpoint")
    return path


__all__ = ["resolve_checkpoint", "is_hub_id", "HUB_PATTERNS"]
