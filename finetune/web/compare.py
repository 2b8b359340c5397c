"""The Compare tab: config changes and losses of chosen versions, their answers to the same prompts, and their
loss on one uploaded eval file.

Showing the tab loads nothing. Comparing is a form POST carrying the session's CSRF token. Config changes and
the losses recorded in the manifests are read at once; answering prompts or scoring an eval file loads every
compared version, so that part is a bounded job run by the inference workers
(:class:`finetune.serving.comparisons.Comparisons`: a few versions and prompts, one comparison at a time per
account) and the browser is sent to its result page, which reloads itself until the job has ended, showing how
many versions have answered and their answers so far.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from ..errors import FinetuneError, NotFoundError
from ..server import access
from . import services
from .core import render, router
from .pages import Form, User, model_context, registry
from .views import number as fmt_number
from .views import parent_label

REFRESH_S = 2  # how often a running comparison's page reloads


def _context(request: Request, user: Any, owner: str, name: str, selected: list[int] | None = None,
             prompts: str = "", eval_id: str = "") -> dict[str, Any]:
    ctx = model_context(request, user, f"{owner}/{name}", "compare")
    versions = registry(request).list_versions(ctx["model"]["model"])
    uploads = [{"id": f.id, "name": f.name} for f in services.list_files(request, user.account)]
    ctx.update(versions=versions, selected=selected or [x.number for x in versions[:2]], prompts_text=prompts,
               errors={}, comparison=None, running=None, uploads=uploads, eval_id=eval_id)
    return ctx


@router.get("/models/{owner}/{name}/compare")
def compare_tab(request: Request, user: User, owner: str, name: str) -> Response:
    """The form (versions, prompts, an eval file); nothing is compared on a GET."""
    return render(request, "tab_compare.html", _context(request, user, owner, name), user=user)


@router.post("/models/{owner}/{name}/compare")
def compare_run(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Compare the chosen versions: at once from their manifests, or, with prompts or an eval file, as a job of
    the inference workers (the answer is a redirect to its page)."""
    from ..compare import compare_versions

    numbers = _numbers(form.getlist("v"))
    prompts_text, eval_id = str(form.get("prompts") or ""), str(form.get("eval") or "")
    ctx = _context(request, user, owner, name, numbers, prompts_text, eval_id)
    lines = [line.strip() for line in prompts_text.splitlines() if line.strip()]
    if len(numbers) < 2:
        ctx["errors"]["_form"] = ["choose two or more versions"]
        return render(request, "tab_compare.html", ctx, status_code=422, user=user)
    reg = registry(request)
    model = ctx["model"]["model"]
    try:
        versions = [access.visible_version(reg, user.account, model, str(n)) for n in numbers]
        if not lines and not eval_id:  # the manifests alone: nothing to load
            ctx["comparison"] = comparison_view(reg, compare_versions(reg, [v.ref for v in versions]).to_dict())
            return render(request, "tab_compare.html", ctx, user=user)
        eval_file = str(services.path_of(request, user.account, eval_id)) if eval_id else None
        job = services.start_comparison(request, user.account, model, versions, lines, eval_file,
                                        {"prompts": prompts_text, "eval": eval_id})
    except NotFoundError:
        raise
    except FinetuneError as err:
        where = ("_form" if err.http_status == 429 else "eval" if eval_id and "eval" in str(err)
                 else "prompts" if lines else "_form")
        ctx["errors"][where] = [str(err)]
        return render(request, "tab_compare.html", ctx, status_code=err.http_status, user=user)
    return RedirectResponse(f"/models/{model}/compare/{job.id}", status_code=303)


@router.get("/models/{owner}/{name}/compare/{job_id}")
def compare_result(request: Request, user: User, owner: str, name: str, job_id: str) -> Response:
    """A comparison's page: running (it reloads itself), its error beside the form, or its result."""
    job = services.comparison(request, user.account, job_id)
    reg = registry(request)
    numbers = []
    for ref in job.refs:
        try:
            numbers.append(reg.resolve(ref).number)
        except NotFoundError:  # deleted since
            pass
    ctx = _context(request, user, owner, name, numbers, job.form.get("prompts", ""), job.form.get("eval", ""))
    if job.status == "running":
        ctx["running"] = {"refs": job.refs, "done": job.done, "total": len(job.refs)}
        ctx["refresh"] = REFRESH_S
        if job.result:  # the versions answered so far
            ctx["comparison"] = comparison_view(reg, job.result)
    elif job.status == "failed":
        ctx["errors"]["_form"] = [job.error or "the comparison failed"]
    else:
        ctx["comparison"] = comparison_view(reg, job.result or {})
    return render(request, "tab_compare.html", ctx, status_code=200 if job.status != "failed" else job.error_status,
                  user=user)


def _numbers(values: list[Any]) -> list[int]:
    out = []
    for value in values:
        try:
            out.append(int(str(value)))
        except ValueError:
            continue
    return out


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:79] + "…"


def comparison_view(reg: Any, result: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a comparison (:meth:`finetune.compare.Comparison.to_dict`)."""
    rows, answers = [], []
    for item in result.get("versions") or []:
        try:
            version = reg.resolve(item["ref"])
        except NotFoundError:  # deleted since it was compared
            continue
        metrics = version.metadata.get("metrics") or {}
        data = version.metadata.get("dataset") or {}
        changes = item.get("config_changes")
        rows.append({
            "ref": version.ref, "number": version.number, "parent": parent_label(version),
            "data": f"{data.get('rows')} rows, {str(data.get('sha256'))[:8]}" if data else "–",
            "train_loss": fmt_number(metrics.get("train_loss")),
            "eval_loss": fmt_number(item["eval_loss"] if item.get("eval_loss") is not None
                                    else metrics.get("eval_loss")),
            "reference": version.ref == result.get("reference"),
            "changes": None if changes is None else [(k, _show(c["from"]), _show(c["to"])) for k, c in changes.items()],
        })
        answers.append((version.ref, item.get("answers") or []))
    texts = list(result.get("prompts") or [])
    prompts = [{"prompt": p, "answers": [(ref, a[i] if i < len(a) else "") for ref, a in answers]}
               for i, p in enumerate(texts)]
    return {"reference": result.get("reference"), "rows": rows, "prompts": prompts,
            "eval_rows": result.get("eval_rows") or 0, "eval_file": bool(result.get("eval_file"))}
