"""``bonefrac site-check``: what a model would do at a new site, from its unlabelled images."""

from __future__ import annotations

from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.cli.common import CLIError, add_model_arg, resolve_model
from bonefrac.cli.extras import require_dicom_for


def add_arguments(p) -> None:
    p.add_argument("site", metavar="DIR", help="a folder of the site's images (unlabelled; "
                                               "read recursively, DICOM included)")
    add_model_arg(p)
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="images the site is compared with (e.g. the model's own validation "
                        "images); default: the model's stored evaluation and gate statistics")
    p.add_argument("--out", default="site_check", metavar="DIR",
                   help="where site_check.html and site_check.json go (default: site_check)")


def run(args) -> int:
    from bonefrac.evaluation.site_check import as_json, check_site, render_html, render_text
    from bonefrac.utils import write_json, write_text

    for d in filter(None, (args.site, args.reference)):
        if not Path(d).is_dir():
            raise CLIError(f"{d}: not a folder")
    require_dicom_for([args.site], "site-check")
    res = check_site(resolve_model(args.model), args.site, reference=args.reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "site_check.html", render_html(res))
    write_json(out / "site_check.json", as_json(res))
    print(render_text(res))
    print(f"-> {out}/site_check.html, {out}/site_check.json")
    print(DISCLAIMER)
    return 0
