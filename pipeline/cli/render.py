"""`greetflow template ...` and `greetflow render ...`."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from pipeline.settings import get_settings


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 1080x1920, not {text!r}") from exc
    return w, h


def _renderer(args: argparse.Namespace) -> Any:
    from pipeline.render.engine import renderer_from_settings

    settings = get_settings()
    r = renderer_from_settings(settings)
    variant = getattr(args, "variant", None)
    size = getattr(args, "size", None)
    if variant:
        r.variant, r.size = variant, None
    elif size:
        r.size = size
    else:  # designers get the template's own default variant
        r.size, r.variant = None, None
    return r


def cmd_template_validate(args: argparse.Namespace) -> int:
    from pipeline.briefs import one_line
    from pipeline.render.templates import load_template_file

    bad = 0
    for f in args.files:
        try:
            lt = load_template_file(Path(f))
        except Exception as exc:  # report every file, each in one line
            print(f"error: {one_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
            bad += 1
            continue
        t = lt.template
        personal = [la.id for la in t.layers if t.is_personal(la)]
        print(
            f"{f}: ok: {t.name}@{t.version}, {t.duration_s:g} s, locales "
            f"{', '.join(loc.value for loc in t.locales)}, variants {', '.join(t.canvas.variants)}, "
            f"personal window {t.personal.start:g}-{t.personal.end:g} s ({', '.join(personal) or 'none'}), "
            f"fields {', '.join(sorted(t.fields_used())) or 'none'}"
        )
    return 1 if bad else 0


def cmd_template_list(args: argparse.Namespace) -> int:
    from pipeline.render.templates import catalog

    for (name, version), lt in sorted(catalog(get_settings().templates_dir).items()):
        t = lt.template
        print(f"{name}@{version}\t{t.title}\t{', '.join(x.value for x in t.locales)}\t{lt.path}")
    return 0


def cmd_template_preview(args: argparse.Namespace) -> int:
    from pipeline.render.preview import preview

    out = preview(
        _renderer(args),
        args.name,
        args.locale,
        Path(args.out),
        name=args.recipient,
        photo=Path(args.photo) if args.photo else None,
        times=args.times,
    )
    for p in out:
        print(p)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from schemas.brief import Recipient, SubjectUse, TemplateRef
    from schemas.common import Locale, Scope
    from schemas.events import RenderRequested

    r = _renderer(args)
    locale = Locale(args.locale)
    out = Path(args.out)
    photo = Path(args.photo) if args.photo else None
    subjects = (SubjectUse(subject_id="designer-preview", scopes=frozenset({Scope.FACE})),) if photo else ()
    recipient = Recipient(
        id="designer",
        name=args.name,
        locale=locale,
        photo_key="preview/photo.jpg" if photo else None,
        subjects=subjects,
    )
    req = RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="designer",
        recipient=recipient,
        template=TemplateRef(
            name=args.template, version=args.version or r.template(args.template).template.version
        ),
        locale=locale,
    )
    res = r.render(req, out.parent, photo=photo, stem=out.stem)
    if res.video_path != out:
        res.video_path.replace(out)
    print(
        f"{out} ({res.width}x{res.height}, {res.duration_s:.2f} s, {res.template} {res.locale.value} "
        f"{res.variant}, {res.lufs:.1f} LUFS, true peak {res.true_peak_db:.1f} dBTP, "
        f"{res.timings['total']:.2f} s)"
    )
    print(f"poster {res.poster_path}")
    if res.captions_path:
        print(f"captions {res.captions_path}")
    return 0


def register(sub: Any) -> None:
    tpl = sub.add_parser("template", help="greeting templates: validate, list, preview")
    tsub = tpl.add_subparsers(dest="template_command", required=True)
    v = tsub.add_parser("validate", help="validate template files (YAML)")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_template_validate)
    ls = tsub.add_parser("list", help="the templates this worker knows")
    ls.set_defaults(func=cmd_template_list)
    pv = tsub.add_parser("preview", help="a few frames as PNG and a contact sheet")
    pv.add_argument("name")
    pv.add_argument("--locale", required=True)
    pv.add_argument("--out", required=True)
    pv.add_argument("--recipient", default=None, help="the name to show (default: a sample per locale)")
    pv.add_argument("--photo", default=None)
    pv.add_argument("--variant", default=None)
    pv.add_argument("--size", type=_size, default=None)
    pv.add_argument("--times", default=None, help="comma-separated seconds (default: one per segment)")
    pv.set_defaults(func=cmd_template_preview)

    rn = sub.add_parser("render", help="render one clip directly (no broker), for designers")
    rn.add_argument("--template", required=True)
    rn.add_argument("--version", default=None)
    rn.add_argument("--locale", required=True)
    rn.add_argument("--name", required=True)
    rn.add_argument("--photo", default=None)
    rn.add_argument("--variant", default=None)
    rn.add_argument("--size", type=_size, default=None)
    rn.add_argument("--out", required=True)
    rn.set_defaults(func=cmd_render)

