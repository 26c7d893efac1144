#!/usr/bin/env bash
# Builds data/debian-docs.txt: a plain-text English corpus made from Debian documentation
# packages (Debian 12 "bookworm"), plus data/debian-docs.manifest, which records the exact
# package versions, the .deb checksums, per-package file / byte counts and the sha256 of the
# corpus, so that anyone can check that they built the same file.
#
#   bash scripts/make_debian_corpus.sh
#
# Needs: apt-get (with Debian bookworm sources and a fresh `apt-get update`), dpkg-deb,
# python3 (3.9+; standard library only), sha256sum.
#
# Each package is fetched with `apt-get download NAME=VERSION` (no root needed, no install),
# unpacked with `dpkg-deb -x` into a temporary directory (rust-doc: only its four books), and a fixed set of its documents is
# converted to plain text (one format per document: HTML where the package ships HTML, POD
# for perl-doc, text for two small policy documents). Navigation, tables of contents, search
# and index pages are dropped; paragraphs are separated by one blank line (the split that
# src/data.rs uses). Identical documents, and repeats of long paragraphs (>= 120 chars), are
# dropped. Documents are written in the order of the sha256 of "package/path", a fixed
# shuffle: src/data.rs holds out the *last* val_fraction of paragraphs, which is then a sample
# of documents from every package rather than the tail of the last ones.
#
# Environment:
#   DEBIAN_CORPUS_WORKDIR  work directory (default: a fresh mktemp -d, removed at exit)
#   DEBIAN_CORPUS_KEEP=1   keep the work directory
#   DEBIAN_CORPUS_OUT      output text file (default: data/debian-docs.txt)
#   DEBIAN_CORPUS_MANIFEST manifest file (default: data/debian-docs.manifest)
#
# If a pinned version is no longer in the archive, the script stops: update the pin (check
# with `apt-cache madison NAME`) and expect a different sha256.
set -euo pipefail

# Pinned packages, in corpus order. Versions as of Debian 12 (bookworm) + bookworm-security.
PACKAGES=(
  debian-reference-en=2.100
  debian-handbook=11.20220922
  developers-reference=12.18
  maint-guide=1.2.53
  debian-policy=4.6.2.0
  debian-faq=11.1
  debian-history=2.28
  harden-doc=3.19+nmu1
  apt-doc=2.6.2
  aptitude-doc-en=0.8.13-5
  bash-doc=5.2.15-2
  gnu-standards=2022.03.23-0.1
  autoconf-doc=2.71-3
  gettext-doc=0.21-12
  git-doc=1:2.39.5-0+deb12u3
  perl-doc=5.36.0-7+deb12u4
  python3.11-doc=3.11.2-6+deb12u9
  python-django-doc=3:3.2.25-0+deb12u7
  sphinx-doc=5.3.0-4
  postgresql-doc-15=15.20-0+deb12u1
  sqlite3-doc=3.40.1-2+deb12u2
  rust-doc=1.63.0+dfsg1-2
)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${DEBIAN_CORPUS_OUT:-$root/data/debian-docs.txt}"
manifest="${DEBIAN_CORPUS_MANIFEST:-$root/data/debian-docs.manifest}"

die() { echo "make_debian_corpus: error: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb python3 sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found (this script needs a Debian system)"
done

if [[ -n "${DEBIAN_CORPUS_WORKDIR:-}" ]]; then
  work="$DEBIAN_CORPUS_WORKDIR"
  mkdir -p "$work"
else
  work="$(mktemp -d -t debian-corpus.XXXXXX)"
  if [[ "${DEBIAN_CORPUS_KEEP:-0}" != 1 ]]; then
    trap 'rm -rf "$work"' EXIT
  fi
fi
echo "==> work directory: $work"
rm -rf "$work/debs" "$work/x"
mkdir -p "$work/debs" "$work/x"
# apt drops privileges to _apt for downloads when run as root; let it write here.
chmod 0755 "$work"; chmod 0777 "$work/debs"

start=$SECONDS
echo "==> downloading ${#PACKAGES[@]} packages"
for spec in "${PACKAGES[@]}"; do
  name="${spec%%=*}"
  version="${spec#*=}"
  if ! apt-cache show "$spec" >/dev/null 2>&1; then
    echo "available versions of $name:" >&2
    apt-cache madison "$name" >&2 || true
    die "package $name version $version is not in the apt lists (run 'apt-get update'?; update the pin in $0 if it was superseded)"
  fi
  echo "    $spec"
  (cd "$work/debs" && apt-get download -q=2 "$spec") || die "apt-get download $spec failed"
done

echo "==> unpacking"
: >"$work/packages.tsv"
for spec in "${PACKAGES[@]}"; do
  name="${spec%%=*}"
  version="${spec#*=}"
  # apt-get download names files NAME_VERSION_ARCH.deb with ':' in the version as '%3a'.
  debs=("$work/debs/${name}_"*.deb)
  [[ ${#debs[@]} -eq 1 && -f "${debs[0]}" ]] || die "expected one .deb for $name, found: ${debs[*]}"
  deb="${debs[0]}"
  got="$(dpkg-deb -f "$deb" Version)"
  [[ "$got" == "$version" ]] || die "$deb has version $got, expected $version"
  mkdir -p "$work/x/$name"
  if [[ "$name" == rust-doc ]]; then
    # 580 MB unpacked, nearly all of it API pages that are not used: unpack the books only
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/x/$name" --wildcards \
      './usr/share/doc/rust-doc/html/book/*' './usr/share/doc/rust-doc/html/reference/*' \
      './usr/share/doc/rust-doc/html/nomicon/*' './usr/share/doc/rust-doc/html/edition-guide/*'
  else
    dpkg-deb -x "$deb" "$work/x/$name"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$version" "$(basename "$deb")" \
    "$(stat -c %s "$deb")" "$(sha256sum "$deb" | cut -d' ' -f1)" >>"$work/packages.tsv"
  echo "    $name $version"
done
echo "    download + unpack: $((SECONDS - start)) s"

echo "==> converting to text"
mkdir -p "$(dirname "$out")" "$(dirname "$manifest")"
python3 - "$work/x" "$work/packages.tsv" "$out" "$manifest" <<'PY'
import gzip, hashlib, html, html.parser, os, re, sys, time, unicodedata
from fnmatch import fnmatchcase

xroot, packages_tsv, out_path, manifest_path = sys.argv[1:5]

# Which files of each package become documents, and how they are read.
# Patterns are fnmatch patterns on the path inside the package ('*' also matches '/').
# Any file matching an EXCLUDE pattern is skipped. Order inside a package: sorted paths.
RULES = {
    "debian-reference-en": [("html", ["usr/share/debian-reference/*.en.html"])],
    "debian-handbook": [("html", ["usr/share/doc/debian-handbook/html/en-US/*.html"])],
    "developers-reference": [("html", ["usr/share/developers-reference/*.html"])],
    "maint-guide": [("html", ["usr/share/doc/maint-guide/html/*.en.html"])],
    "debian-policy": [
        ("html", ["usr/share/doc/debian-policy/policy.html/*.html",
                  "usr/share/doc/debian-policy/perl-policy.html/*.html"]),
        ("text", ["usr/share/doc/debian-policy/menu-policy.txt.gz",
                  "usr/share/doc/debian-policy/debconf_specification.txt.gz"]),
    ],
    "debian-faq": [("html", ["usr/share/doc/debian/FAQ/*.en.html"])],
    "debian-history": [("html", ["usr/share/doc/debian-history/docs/*.en.html"])],
    "harden-doc": [("html", ["usr/share/doc/harden-doc/html/en-US/*.html"])],
    "apt-doc": [("html", ["usr/share/doc/apt-doc/guide.html/*.html",
                          "usr/share/doc/apt-doc/offline.html/*.html"])],
    "aptitude-doc-en": [("html", ["usr/share/doc/aptitude/html/en/*.html"])],
    "bash-doc": [("html", ["usr/share/doc/bash/bashref.html"])],
    "gnu-standards": [("html", ["usr/share/doc/gnu-standards/standards.html",
                                "usr/share/doc/gnu-standards/maintain.html"])],
    "autoconf-doc": [("html", ["usr/share/doc/autoconf/autoconf.html"])],
    "gettext-doc": [("html", ["usr/share/doc/gettext/gettext_*.html",
                              "usr/share/doc/gettext/tutorial.html"])],
    "git-doc": [("html", ["usr/share/doc/git-doc/*.html"])],
    "perl-doc": [("pod", ["usr/share/perl/5.36.0/pod/*.pod"])],
    "python3.11-doc": [("html", ["usr/share/doc/python3.11/html/*.html"])],
    "python-django-doc": [("html", ["usr/share/doc/python-django-doc/html/*.html"])],
    "sphinx-doc": [("html", ["usr/share/doc/sphinx-doc/html/*.html"])],
    "postgresql-doc-15": [("html", ["usr/share/doc/postgresql-doc-15/html/*.html"])],
    "sqlite3-doc": [("html", ["usr/share/doc/sqlite3/*.html"])],
    # book: the current edition's pages only (the other top-level pages are stubs that
    # point at the retired first edition)
    "rust-doc": [("html", ["usr/share/doc/rust-doc/html/book/ch*.html",
                           "usr/share/doc/rust-doc/html/book/appendix-*.html",
                           "usr/share/doc/rust-doc/html/book/foreword.html",
                           "usr/share/doc/rust-doc/html/reference/*.html",
                           "usr/share/doc/rust-doc/html/nomicon/*.html",
                           "usr/share/doc/rust-doc/html/edition-guide/*.html"])],
}
EXCLUDE = [
    # all-in-one copies of multi-page manuals, search / index / table-of-contents pages
    "*/developers-reference/developers-reference.html",
    "*/search.html", "*/genindex*.html", "*/py-modindex.html", "*/searchindex*",
    "*/_sources/*", "*/_static/*", "*/_modules/*", "*/_images/*",
    "*/print.html", "*/toc.html", "*/404.html",
    "*/gettext_toc.html", "*/gettext_abt.html", "*/gettext_fot.html",
    "*/postgresql-doc-15/html/bookindex.html",
    "*/debian-handbook/html/en-US/ix01.html",
    "*/harden-doc/html/en-US/ix01.html",
    # long machine-written change logs
    "*/python3.11/html/whatsnew/changelog.html",
    "*/sqlite3/releaselog/*", "*/sqlite3/c3ref/*", "*/sqlite3/syntax/*",
    "*/sqlite3/changes.html", "*/sqlite3/chronology.html",
    "*/sqlite3/sitemap.html", "*/sqlite3/keyword_index.html", "*/sqlite3/docs.html",
    "*/git-doc/RelNotes*", "*/git-doc/index.html",
    "*/pod/perltoc.pod", "*/pod/perl5*delta.pod",
    "*/html/book/first-edition/*", "*/html/book/second-edition/*",
    "*/html/book/2018-edition/*",
]

# ---------------------------------------------------------------------------------- HTML
SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "form", "button",
             "select", "textarea", "object", "iframe", "template", "map"}
SKIP_CLASSES = {
    "navheader", "navfooter", "toc", "toc-backref", "sphinxsidebar", "related",
    "footer", "headerlink", "breadcrumbs", "nav-wrapper", "nav-wide-wrapper",
    "menu-bar", "docutils-toc", "contents", "topic-contents", "lot", "list-of-tables",
    "list-of-figures", "list-of-examples", "navigation", "docNav", "skip-link",
    "mobile-nav", "menu", "nosearch", "searchbox", "copyright-notice", "legalnotice",
    "toctree-wrapper", "theme-popup", "fnlist", "docnav", "copiable-anchor",
}
SKIP_IDS = {"sidebar", "menu-bar", "banner", "searchbar-outer", "search-results",
            "navigation", "footer", "toc", "docs-version", "header", "legalnotice",
            "site-header", "rel-links", "hd", "ft", "title", "global-nav"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "param", "source", "track", "wbr", "keygen", "command", "basefont", "frame",
        "isindex"}
BLOCK = {"p", "div", "section", "article", "main", "aside", "header", "footer",
         "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd",
         "table", "thead", "tbody", "tfoot", "caption", "blockquote", "figure",
         "figcaption", "address", "center", "hr", "body", "html", "fieldset", "details",
         "summary", "menu", "dir"}
BR = "\u2028"  # stands for <br> inside inline text until the paragraph is written


class HTMLToText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []        # (tag, skipped)
        self.skip = 0          # number of skipped elements on the stack
        self.paras = []
        self.inline = []       # pieces of the current paragraph
        self.pre = 0
        self.pre_buf = []
        self.row = None        # cells of the current table row
        self.table_lines = None
        self.list_prefix = None

    # -- paragraph assembly
    def flush(self):
        text = "".join(self.inline)
        self.inline = []
        text = re.sub(r"[ \t\r\n\f\v\u00a0]+", " ", text)
        text = "\n".join(line.strip() for line in text.split(BR))
        text = re.sub(r"\n{2,}", "\n", text).strip()
        if self.list_prefix and text:
            text = self.list_prefix + text
        self.list_prefix = None
        if not text:
            return
        if self.row is not None:
            self.row.append(text.replace("\n", " "))
        elif self.table_lines is not None:
            self.table_lines.append(text)
        else:
            self.paras.append(text)

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            if self.skip:
                return
            if tag == "br":
                if self.pre:
                    self.pre_buf.append("\n")
                else:
                    self.inline.append(BR)
            elif tag == "hr" and not self.pre:
                self.flush()
            elif tag == "img" and not self.pre:
                pass
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skipped = (tag in SKIP_TAGS or bool(classes & SKIP_CLASSES)
                   or (a.get("id") or "") in SKIP_IDS or a.get("role") == "navigation"
                   or a.get("aria-hidden") == "true" or "hidden" in a)
        self.stack.append((tag, skipped))
        if skipped:
            self.skip += 1
        if self.skip:
            return
        if tag == "pre":
            if not self.pre:
                self.flush()
                self.pre_buf = []
            self.pre += 1
        elif self.pre:
            return
        elif tag == "table":
            self.flush()
            if self.table_lines is None:
                self.table_lines = []
        elif tag == "tr":
            self.flush()
            if self.table_lines is not None:
                self.row = []
        elif tag in ("td", "th"):
            self.flush()
        elif tag in BLOCK:
            self.flush()
            if tag == "li":
                self.list_prefix = "- "

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        # pop until the matching open tag (tolerates unclosed <p>, <li>, ...)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                break
        else:
            return
        while len(self.stack) > i:
            t, skipped = self.stack.pop()
            self._close(t, skipped)

    def _close(self, tag, skipped):
        if self.skip:
            if skipped:
                self.skip -= 1
            return
        if tag == "pre":
            self.pre -= 1
            if self.pre == 0:
                self.emit_pre()
        elif self.pre:
            return
        elif tag in ("td", "th"):
            self.flush()
        elif tag == "tr":
            self.flush()
            if self.row is not None:
                cells = [c for c in self.row if c]
                if cells and self.table_lines is not None:
                    self.table_lines.append(" | ".join(cells))
                self.row = None
        elif tag == "table":
            self.flush()
            if self.row is not None:
                self.row = None
            if self.table_lines is not None:
                lines = self.table_lines
                self.table_lines = None
                if lines:
                    self.paras.append("\n".join(lines))
        elif tag in BLOCK:
            self.flush()

    def emit_pre(self):
        text = "".join(self.pre_buf).expandtabs(8)
        self.pre_buf = []
        lines = [l.rstrip() for l in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        block = "\n".join(lines).strip("\n")
        block = re.sub(r"\n{3,}", "\n\n", block)
        if block.strip():
            if self.table_lines is not None:
                self.table_lines.append(block)
            else:
                self.paras.append(block)

    def handle_data(self, data):
        if self.skip:
            return
        if self.pre:
            self.pre_buf.append(data)
        else:
            self.inline.append(data)

    def close(self):
        super().close()
        while self.stack:
            t, skipped = self.stack.pop()
            self._close(t, skipped)
        self.flush()
        if self.pre_buf:
            self.emit_pre()


def read_bytes(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def decode(data):
    m = re.search(rb'<meta[^>]+charset=["\']?([A-Za-z0-9_-]+)', data[:4096], re.I)
    enc = m.group(1).decode("ascii").lower() if m else "utf-8"
    try:
        return data.decode(enc)
    except (LookupError, UnicodeDecodeError):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def html_to_paras(path):
    p = HTMLToText()
    p.feed(decode(read_bytes(path)))
    p.close()
    return p.paras


# ----------------------------------------------------------------------------------- text
def text_to_paras(path):
    text = decode(read_bytes(path)).expandtabs(8)
    paras = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [l.rstrip() for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        indents = {len(l) - len(l.lstrip()) for l in lines}
        if len(indents) == 1:  # plain wrapped paragraph: unwrap
            paras.append(" ".join(l.strip() for l in lines))
        else:                  # indented / preformatted: keep the lines
            n = min(indents)
            paras.append("\n".join(l[n:] for l in lines))
    return paras


# ------------------------------------------------------------------------------------ POD
def pod_inline(s):
    """Expands POD formatting codes (B<>, C<<< >>>, L<>, E<>, X<>, ...)."""
    out = []
    i = 0
    n = len(s)

    def parse(i, closer):
        buf = []
        while i < n:
            if closer and s.startswith(closer, i):
                return "".join(buf), i + len(closer)
            c = s[i]
            if c in "BCEFILSXZ" and i + 1 < n and s[i + 1] == "<":
                j = i + 1
                k = j
                while k < n and s[k] == "<":
                    k += 1
                depth = k - j
                if depth > 1:
                    if k < n and s[k] in " \t\n":
                        inner_close = " " + ">" * depth
                        inner, i2 = parse_raw(k, inner_close)
                        inner = inner.strip()
                    else:
                        inner, i2 = parse(k, ">" * depth)
                else:
                    inner, i2 = parse(k, ">")
                buf.append(apply(c, inner))
                i = i2
                continue
            buf.append(c)
            i += 1
        return "".join(buf), i

    def parse_raw(i, closer):
        # inside C<< ... >>: codes still apply, but a lone '>' does not close
        end = s.find(closer, i)
        if end < 0:
            end = n
        inner, _ = sub_parse(s[i:end])
        return inner, min(n, end + len(closer))

    def sub_parse(t):
        nonlocal s, n
        saved = (s, n)
        s, n = t, len(t)
        try:
            return parse(0, None)
        finally:
            s, n = saved

    def apply(code, inner):
        if code in "XZ":
            return ""
        if code == "E":
            name = inner.strip()
            if name.isdigit():
                return chr(int(name))
            if name.lower().startswith("0x"):
                return chr(int(name, 16))
            special = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
            if name in special:
                return special[name]
            return html.unescape(f"&{name};")
        if code == "L":
            if "|" in inner:
                return inner.split("|", 1)[0]
            if re.match(r"^\w+://", inner):
                return inner
            if "/" in inner:
                page, sec = inner.split("/", 1)
                sec = sec.strip('"')
                return f'"{sec}" in {page}' if page else f'"{sec}"'
            return inner
        return inner

    result, _ = parse(0, None)
    return result


def pod_to_paras(path):
    text = decode(read_bytes(path)).replace("\r\n", "\n").expandtabs(8)
    blocks = re.split(r"\n[ \t]*\n", text)
    paras = []
    in_pod = False
    begin = None       # name of a =begin block being skipped (non-text formats)
    item_prefix = None
    for block in blocks:
        if not block.strip():
            continue
        first = block.lstrip("\n")
        if first.startswith("="):
            m = re.match(r"=(\w+)\s*(.*)", first, re.S)
            cmd, arg = m.group(1), m.group(2).strip()
            in_pod = cmd != "cut"
            if begin is not None:
                if cmd == "end":
                    begin = None
                continue
            if cmd == "begin":
                fmt = arg.split()[0] if arg else ""
                if fmt.lower() not in ("text", ":text"):
                    begin = fmt
                continue
            if cmd.startswith("head"):
                t = pod_inline(" ".join(arg.split()))
                if t:
                    paras.append(t)
            elif cmd == "item":
                t = pod_inline(" ".join(arg.split()))
                if t in ("", "*", "-") or re.fullmatch(r"\d+\.?", t):
                    item_prefix = "- " if not t[:1].isdigit() else t.rstrip(".") + ". "
                else:
                    paras.append("- " + t)
            elif cmd == "for":
                pass
            continue
        if not in_pod or begin is not None:
            continue
        if block[:1] in " \t":  # verbatim paragraph
            lines = [l.rstrip() for l in block.split("\n")]
            while lines and not lines[0].strip():
                lines.pop(0)
            while lines and not lines[-1].strip():
                lines.pop()
            ind = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
            paras.append("\n".join(l[ind:] for l in lines))
        else:
            t = pod_inline(" ".join(block.split()))
            if t:
                if item_prefix:
                    t = item_prefix + t
                paras.append(t)
        item_prefix = None
    return paras


# ------------------------------------------------------------------------------ assembly
CONVERT = {"html": html_to_paras, "text": text_to_paras, "pod": pod_to_paras}
# paragraphs that are page furniture, not content
BOILERPLATE = re.compile(
    r"^(?:\[[^\]\n]{1,12}\](?:\s*\|\s*\[[^\]\n]{1,12}\])+"  # texi2html: [ << ] | [ >> ] | [Top]
    r"|This document was generated (?:by|on) .* using texi2html.*"
    r"|This page last modified on \d{4}-\d\d-\d\d.*"          # sqlite
    r"|Rust \d+\.\d+\.\d+)$")                                  # mdbook header
CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\u00ad]")


def clean_para(p):
    p = unicodedata.normalize("NFC", p)
    p = CTRL.sub("", p.replace("\u00a0", " ").replace("\u2028", "\n").replace("\u2029", "\n"))
    lines = [l.rstrip() for l in p.split("\n")]
    p = "\n".join(lines).strip("\n")
    if not p.strip():
        return ""
    # a paragraph must not contain a blank line (the loader splits on "\n\n")
    p = re.sub(r"\n\s*\n", "\n", p)
    # drop paragraphs with no letters or digits at all (decorations, lone punctuation)
    if not re.search(r"\w", p) or BOILERPLATE.match(p):
        return ""
    return p


packages = []
with open(packages_tsv) as f:
    for line in f:
        name, version, deb, size, sha = line.rstrip("\n").split("\t")
        packages.append((name, version, deb, int(size), sha))

t0 = time.time()
seen_docs = set()
seen_paras = set()
stats = []
total_dup_docs = 0
total_dup_paras = 0
documents = []  # (order key, text)
if True:
    for name, version, deb, size, sha in packages:
        if name not in RULES:
            sys.exit(f"no conversion rule for package {name}")
        base = os.path.join(xroot, name)
        all_files = []
        for dirpath, dirnames, filenames in os.walk(base):
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                if os.path.isfile(full) and not os.path.islink(full):
                    all_files.append(os.path.relpath(full, base).replace(os.sep, "/"))
        all_files.sort()
        chosen = []
        for fmt, pats in RULES[name]:
            for rel in all_files:
                if any(fnmatchcase(rel, p) for p in pats) and \
                        not any(fnmatchcase(rel, e) for e in EXCLUDE):
                    chosen.append((rel, fmt))
        # every pattern must match something: a changed package layout must not pass silently
        for fmt, pats in RULES[name]:
            for p in pats:
                if not any(fnmatchcase(rel, p) for rel in all_files):
                    sys.exit(f"{name}: pattern {p} matches no file (package layout changed?)")
        n_docs = n_dup = n_bytes = n_paras = n_dup_paras = 0
        for rel, fmt in sorted(chosen):
            paras = [clean_para(p) for p in CONVERT[fmt](os.path.join(base, rel))]
            paras = [p for p in paras if p]
            doc = "\n\n".join(paras)
            if not doc:
                continue
            h = hashlib.sha256(doc.encode("utf-8")).digest()
            if h in seen_docs:
                n_dup += 1
                continue
            seen_docs.add(h)
            kept = []
            for p in paras:
                if len(p) >= 120:
                    ph = hashlib.sha256(p.encode("utf-8")).digest()
                    if ph in seen_paras:
                        n_dup_paras += 1
                        continue
                    seen_paras.add(ph)
                kept.append(p)
            if not kept:
                continue
            doc = "\n\n".join(kept)
            key = hashlib.sha256(f"{name}/{rel}".encode("utf-8")).hexdigest()
            documents.append((key, doc))
            n_docs += 1
            n_paras += len(kept)
            n_bytes += len(doc.encode("utf-8"))
        if n_docs == 0:
            sys.exit(f"{name}: no documents converted")
        total_dup_docs += n_dup
        total_dup_paras += n_dup_paras
        stats.append((name, version, deb, size, sha, n_docs, n_paras, n_bytes))
        print(f"    {name:22s} {version:24s} {n_docs:5d} docs {n_paras:7d} paragraphs "
              f"{n_bytes:10d} bytes  (dropped: {n_dup} duplicate docs, "
              f"{n_dup_paras} repeated paragraphs)", flush=True)
# Documents in the order of the sha256 of "package/path": a fixed shuffle, so that the held-out
# tail (src/data.rs holds out the last paragraphs) samples every package.
documents.sort()
with open(out_path + ".tmp", "w", encoding="utf-8", newline="\n") as out:
    out.write("\n\n".join(doc for _, doc in documents))
    out.write("\n")
os.replace(out_path + ".tmp", out_path)

h = hashlib.sha256()
size = 0
with open(out_path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
digest = h.hexdigest()
total_docs = sum(s[5] for s in stats)
total_paras = sum(s[6] for s in stats)
print(f"    converted in {time.time() - t0:.1f} s")

with open(manifest_path, "w", encoding="utf-8", newline="\n") as m:
    m.write("# data/debian-docs.txt, built by scripts/make_debian_corpus.sh\n")
    m.write("# Debian 12 (bookworm) documentation packages, converted to plain text.\n")
    m.write(f"# python: {sys.version.split()[0]}\n")
    m.write(f"corpus: {os.path.basename(out_path)}\n")
    m.write(f"corpus_bytes: {size}\n")
    m.write(f"corpus_sha256: {digest}\n")
    m.write(f"documents: {total_docs}\n")
    m.write(f"paragraphs: {total_paras}\n")
    m.write(f"dropped_duplicate_documents: {total_dup_docs}\n")
    m.write(f"dropped_repeated_paragraphs: {total_dup_paras}\n")
    m.write("\n# package\tversion\tdocuments\tparagraphs\ttext_bytes\tdeb_file\tdeb_bytes\tdeb_sha256\n")
    for name, version, deb, dsize, sha, nd, np_, nb in stats:
        m.write(f"{name}\t{version}\t{nd}\t{np_}\t{nb}\t{deb}\t{dsize}\t{sha}\n")
print(f"==> wrote {out_path}: {size} bytes, {total_docs} documents, {total_paras} paragraphs")
print(f"    sha256 {digest}")
print(f"==> wrote {manifest_path}")
PY
echo "==> done in $((SECONDS - start)) s"
