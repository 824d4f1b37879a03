"""Upload a finished output folder to the Hugging Face Hub through huggingface_hub.

Honours ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` like every Hub call. The
repository is created if needed (``private`` only applies then); a ``revision`` other
than ``main`` is created as a branch; ``create_pr`` opens a pull request instead of
committing to the branch.
"""

from __future__ import annotations

from pathlib import Path

from bitquant.errors import BitquantError, SourceError, unreachable


class PublishError(BitquantError):
    """The upload failed (exit code 1: the output is complete and kept)."""

    exit_code = 1


def push_folder(folder: Path, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, create_pr: bool = False, message: str = "Upload with bitquant") -> str:
    """Upload ``folder`` to ``repo_id``; returns the commit or pull-request URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SourceError(f"--push-to-hub {repo_id!r} is not a valid Hub repo id (like 'org/name')") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 create_pr=create_pr, commit_message=message)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PublishError(
                f"the Hub refused the upload to {repo_id} ({status}): set HF_TOKEN or --token to a token with write access; "
                f"the output in {folder} is complete"
            ) from None
        raise PublishError(f"uploading to {repo_id} failed: {str(e).splitlines()[0]}; the output in {folder} is complete") from None
    except Exception as e:
        if not unreachable(e):
            raise
        raise PublishError(f"uploading to {repo_id} failed: {e}; the output in {folder} is complete") from None
    return info.pr_url or info.commit_url
