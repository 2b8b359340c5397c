"""The pages: models, a model's tabs (Versions, Trainings; Compare is in :mod:`.compare`), a version, and version
deletion.

Every page reads through the API's access rules (:mod:`finetune.server.access`) and the registry's fact
functions; the Train tab lives in :mod:`.train`, the training page and the playground in :mod:`.live`.
"""

from __future__ import annotations

import io
import zipfile
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from markupsafe import Markup

from ..errors import AlreadyExistsError, FinetuneError, InvalidNameError, ModelLoadError, NotFoundError
from ..names import check_name
from ..registry import HARDWARE, VISIBILITIES, Registry
from ..registry.jobs import Trainings
from ..registry.lineage import lineage
from ..registry.summary import model_summary
from ..server import access
from ..server.context import base_url
from .charts import loss_chart_svg
from .core import WebUser, check_csrf, render, router, signed_in
from .markdown import render_markdown
from .views import number as fmt_number
from .views import parent_label, size, training_view, version_row, when

TABS = (("versions", "Versions"), ("train", "Train"), ("trainings", "Trainings"), ("playground", "Playground"),
        ("compare", "Compare"), ("settings", "Settings"))
OWNER_TABS = {"settings"}  # shown to the model's owner only
User = Annotated[WebUser, Depends(signed_in)]
Form = Annotated[dict, Depends(check_csrf)]


def registry(request: Request) -> Registry:
    return request.app.state.registry


def model_trainings(reg: Registry, model: str) -> list:
    """Training records whose destination is ``model``, newest first."""
    return [r for r in Trainings(reg).list() if r.destination == model]


def model_context(request: Request, user: WebUser, name: str, tab: str) -> dict[str, Any]:
    """What every tab shows in its header; 404 for a model the user may not see (the access rule)."""
    from .start_points import holds_base

    reg = registry(request)
    model = access.visible_model(reg, user.account, name)
    summary = model_summary(reg, model)
    owner = model.owner == user.account
    tabs = [(key, label) for key, label in TABS if owner or key not in OWNER_TABS]
    return {"model": summary, "tabs": tabs, "tab": tab, "title": f"{model.full_name} · {dict(TABS)[tab]}",
            "can_write": owner, "model_obj": model, "is_base": holds_base(reg, model.full_name)}


# ---------------------------------------------------------------- models
def _models_page(request: Request, user: WebUser, form: dict[str, str] | None = None,
                 errors: dict[str, list[str]] | None = None, status_code: int = 200) -> Response:
    from .start_points import holds_base

    reg = registry(request)
    trainings = Trainings(reg).list()
    last: dict[str, str] = {}
    for record in trainings:  # newest first: the first seen per destination is its last training
        last.setdefault(record.destination, str(record.status))
    models = []
    for m in access.visible_models(reg, user.account):
        row = model_summary(reg, m)
        row["latest_number"] = int(row["latest"].rsplit(":", 1)[1]) if row["latest"] else None
        row["last_training"] = last.get(m.full_name) if m.owner == user.account else None
        row["is_base"] = holds_base(reg, m.full_name)
        mine = m.owner == user.account and not row["is_base"]
        row["train_label"] = "Train" if mine else "Train from" if row["versions"] else None
        models.append(row)
    models.sort(key=lambda r: (r["owner"] != user.account, r["model"]))
    form = form or {"owner": user.account, "name": "", "description": "", "visibility": "private",
                    "hardware": "auto"}
    return render(request, "models.html", {"title": "Models", "nav": "models", "models": models, "form": form,
                                           "errors": errors or {}, "visibilities": VISIBILITIES,
                                           "hardware": HARDWARE}, status_code=status_code, user=user)


@router.get("/")
def models_page(request: Request, user: User) -> Response:
    return _models_page(request, user)


def new_model_problems(account: str, values: dict[str, str]) -> dict[str, list[str]]:
    """The problems of a new model's fields (``owner``, ``name``, ``visibility``, ``hardware``) with the API's
    checks, in the API's order, every one at once, by field."""
    from ..server.hardware import normalize_hardware

    errors: dict[str, list[str]] = {}
    for key, what in (("owner", "owner"), ("name", "model name")):
        try:
            check_name(values.get(key, ""), what)
        except InvalidNameError as err:
            errors[key] = [str(err)]
    if "owner" not in errors:
        try:
            access.check_create(account, values["owner"])
        except FinetuneError as err:
            errors["owner"] = [str(err)]
    visibility = values.get("visibility", "private")
    if visibility not in VISIBILITIES:
        errors["visibility"] = [f"invalid visibility {visibility!r} — use one of: {', '.join(VISIBILITIES)}"]
    hardware = values.get("hardware", "auto")
    if normalize_hardware(hardware) not in HARDWARE:  # the registry's list; its own check stops at the first field
        errors["hardware"] = [f"invalid hardware {hardware!r} — use one of: {', '.join(HARDWARE)}"]
    return errors


def create_checked_model(reg: Registry, values: dict[str, str]) -> dict[str, list[str]]:
    """Create the model of checked ``values``; the problem by field when the registry refuses it."""
    from ..server.hardware import normalize_hardware

    name = f"{values['owner']}/{values['name']}"
    try:
        reg.create_model(name, description=values.get("description", ""), visibility=values.get("visibility",
                         "private"), hardware=normalize_hardware(values.get("hardware", "auto")))
    except AlreadyExistsError:
        return {"name": [f"model {name} already exists"]}
    except FinetuneError as err:
        return {"_form": [str(err)]}
    return {}


@router.post("/models")
def create_model(request: Request, user: User, form: Form) -> Response:
    """Create a model with the API's checks, in the API's order; each problem goes next to its field."""
    values = {k: str(form.get(k) or "").strip() for k in ("owner", "name", "description", "visibility", "hardware")}
    errors = new_model_problems(user.account, values) or create_checked_model(registry(request), values)
    if not errors:
        return RedirectResponse(f"/models/{values['owner']}/{values['name']}/train", status_code=303)
    return _models_page(request, user, values, errors, status_code=422)


# ---------------------------------------------------------------- a model's tabs
@router.get("/models/{owner}/{name}")
def versions_tab(request: Request, user: User, owner: str, name: str) -> Response:
    ctx = model_context(request, user, f"{owner}/{name}", "versions")
    versions = registry(request).list_versions(ctx["model"]["model"], manifests=True)
    ctx["versions"] = [version_row(v) for v in versions]
    readme = ctx["model_obj"].readme
    ctx["readme"] = render_markdown(readme, lambda rel: "#") if readme else None  # the model's own README
    return render(request, "tab_versions.html", ctx, user=user)


@router.get("/models/{owner}/{name}/trainings")
def trainings_tab(request: Request, user: User, owner: str, name: str) -> Response:
    ctx = model_context(request, user, f"{owner}/{name}", "trainings")
    records = model_trainings(registry(request), ctx["model"]["model"])
    ctx["trainings"] = [training_view(r) for r in records if access.owner_of(r) == user.account]
    return render(request, "tab_trainings.html", ctx, user=user)


# ---------------------------------------------------------------- a version
def _version_base(owner: str, name: str, number: int) -> str:
    return f"/models/{owner}/{name}/versions/{number}"


@router.get("/models/{owner}/{name}/versions/{number}")
def version_page(request: Request, user: User, owner: str, name: str, number: int) -> Response:
    reg = registry(request)
    model = access.visible_model(reg, user.account, f"{owner}/{name}")
    v = access.visible_version(reg, user.account, model.full_name, str(number))
    meta = v.metadata
    metrics = meta.get("metrics") or {}
    data = meta.get("dataset") or {}
    files = v.manifest.get("files") or {}
    base = _version_base(owner, name, v.number)
    hops, lineage_error = [], None
    try:
        chain = lineage(reg, v)
    except (ModelLoadError, NotFoundError, FinetuneError) as err:
        chain, lineage_error = [v], str(err)
    for hop in chain:
        readable = access.can_read(user.account, reg.get_model(hop.model))
        hops.append({"ref": hop.ref, "id": hop.id, "kind": hop.kind,
                     "url": _version_base(*hop.model.split("/"), hop.number) if readable else None,
                     "origin": parent_label(hop) if hop.kind == "base" else ""})
    rows = []
    training_id = meta.get("training_id")
    if training_id:
        try:
            from ..training.metrics import MetricsLog

            rows = MetricsLog(reg.training_paths(training_id).metrics).read()
        except FinetuneError:
            rows = []
    card = None
    if "README.md" in files:
        text = (v.path / "README.md").read_text(encoding="utf-8", errors="replace")
        card = render_markdown(text, lambda rel: f"{base}/files/{rel}" if rel in files else "#")
    host = base_url(request)  # never the Host header
    view = {
        "ref": v.ref, "id": v.id, "kind": v.kind, "created": when(v.created_at), "parent": parent_label(v),
        "training_id": training_id if training_id and _owns_training(reg, user, training_id) else None,
        "format": (meta.get("prompt_format") or {}).get("name"),
        "data": f"{str(data.get('path', '?')).rsplit('/', 1)[-1]} · {data.get('rows')} rows · sha256 "
                f"{str(data.get('sha256'))[:12]}" if data else None,
        "train_loss": fmt_number(metrics.get("train_loss")), "eval_loss": fmt_number(metrics.get("eval_loss")),
        "tokens_per_s": fmt_number(metrics.get("tokens_per_s"), 0) if metrics.get("tokens_per_s") else "–",
        "files": len(files), "size": size(sum(int(f.get("size", 0)) for f in files.values())),
        "aliases": sorted(a for a, n in reg.aliases(model.full_name).items() if n == v.number),
    }
    ctx = {"title": v.ref, "model": model_summary(reg, model), "v": view, "lineage": hops,
           "lineage_error": lineage_error, "chart": Markup(loss_chart_svg(rows)) if rows else None, "card": card,
           "snippets": snippets(v.ref, v.id, host, model.full_name), "download_url": f"{base}/adapter.zip"}
    return render(request, "version.html", ctx, user=user)


def _owns_training(reg: Registry, user: WebUser, training_id: str) -> bool:
    try:
        return access.owner_of(Trainings(reg).get(training_id)) == user.account
    except FinetuneError:
        return False


def snippets(ref: str, version_id: str, host: str, model: str) -> list[tuple[str, str, str]]:
    """Copy-paste ways to use a version: CLI, Python, the replicate client, curl."""
    prompt = "What is the capital of France?"
    return [
        ("Command line", "bash", f'finetune predict {ref} "{prompt}"'),
        ("Python", "python", f'import finetune\n\nmodel, tokenizer = finetune.load("{ref}")'),
        ("replicate client", "python",
         f'import replicate\n\nclient = replicate.Client(api_token="YOUR_TOKEN", base_url="{host}")\n'
         f'output = client.run("{model}:{version_id}", input={{"prompt": "{prompt}"}})\nprint("".join(output))'),
        ("curl", "bash",
         f'curl -s -X POST {host}/v1/predictions \\\n  -H "Authorization: Bearer $FINETUNE_API_TOKEN" \\\n'
         f'  -H "Content-Type: application/json" -H "Prefer: wait" \\\n'
         f'  -d \'{{"version": "{version_id}", "input": {{"prompt": "{prompt}"}}}}\''),
    ]


@router.get("/models/{owner}/{name}/versions/{number}/files/{path:path}")
def version_file(request: Request, user: User, owner: str, name: str, number: int, path: str) -> Response:
    """One file of a version, by its manifest entry (nothing outside the manifest is served)."""
    reg = registry(request)
    v = access.visible_version(reg, user.account, f"{owner}/{name}", str(number))
    if path not in (v.manifest.get("files") or {}):
        raise NotFoundError(f"{v.ref} has no file {path}")
    media = {"png": "image/png", "md": "text/plain; charset=utf-8", "json": "application/json"}
    kind = media.get(path.rsplit(".", 1)[-1], "application/octet-stream")
    filename = path.rsplit("/", 1)[-1]
    headers = {} if kind == "image/png" else {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response((v.path / path).read_bytes(), media_type=kind, headers=headers)


@router.get("/models/{owner}/{name}/versions/{number}/adapter.zip")
def adapter_zip(request: Request, user: User, owner: str, name: str, number: int) -> Response:
    """The version's files (the PEFT adapter folder with its manifest) as one zip."""
    reg = registry(request)
    v = access.visible_version(reg, user.account, f"{owner}/{name}", str(number))
    reg.check(v)  # never hand out files that differ from the manifest
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in sorted(v.manifest.get("files") or {}):
            archive.write(v.path / rel, rel)
        archive.write(v.path / "manifest.json", "manifest.json")
    buffer.seek(0)
    filename = f"{owner}-{name}-{v.number}.zip"
    return StreamingResponse(buffer, media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.post("/models/{owner}/{name}/versions/{number}/delete")
def delete_version(request: Request, user: User, form: Form, owner: str, name: str, number: int) -> Response:
    """Delete a version as the CLI does (``Registry.delete_version``: refused while aliased or a parent)."""
    reg = registry(request)
    v = access.owned_version(reg, user.account, f"{owner}/{name}", str(number), action="delete versions of")
    try:
        reg.delete_version(v.ref)
    except FinetuneError as err:
        user.session.flash = {"kind": "bad", "text": f"Not deleted: {err}"}
    else:
        user.session.flash = {"kind": "ok", "text": f"Deleted {v.ref}."}
    return RedirectResponse(f"/models/{owner}/{name}", status_code=303)
