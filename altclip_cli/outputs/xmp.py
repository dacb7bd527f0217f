"""XMP packets: reading one, setting the keywords that one hierarchy root owns, writing it back.

Keywords live in three properties of a packet's rdf:Description elements:
  dc:subject                an rdf:Bag of flat keywords (every photo manager reads it)
  lr:hierarchicalSubject    an rdf:Bag of "root|keyword" paths (Lightroom, darktable, digiKam)
  digiKam:TagsList          an rdf:Seq of "root/keyword" paths (digiKam)
The keywords under a root ("altclip|猫", "altclip/猫") are the root's owner's; every other keyword,
property, description, comment and namespace of the packet is kept. The text before and after
the packet's root element (the xpacket wrapper and its padding) is kept byte for byte; the element
tree is written back by xml.etree with the packet's own namespace prefixes, so what altclip did
not touch keeps its meaning (same properties and values), if not always its exact bytes.

No model knowledge here: the caller says which keywords a root holds.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import AltclipError

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM = "http://www.digikam.org/ns/1.0/"
X = "adobe:ns:meta/"

# (property, container, separator of its hierarchy levels or None for flat keywords)
FIELDS = ((f"{{{DC}}}subject", "Bag", None),
          (f"{{{LR}}}hierarchicalSubject", "Bag", "|"),
          (f"{{{DIGIKAM}}}TagsList", "Seq", "/"))

PREFIXES = {"x": X, "rdf": RDF, "dc": DC, "lr": LR, "digiKam": DIGIKAM}

# A packet as altclip writes it when a photo has no sidecar yet; the toolkit name marks it as
# altclip's own, so that removing altclip's keywords may remove the file when nothing else is left.
TOOLKIT = "altclip"
NEW_PACKET = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
              f'<x:xmpmeta xmlns:x="{X}" x:xmptk="{TOOLKIT}">\n'
              f' <rdf:RDF xmlns:rdf="{RDF}">\n'
              '  <rdf:Description rdf:about=""/>\n'
              ' </rdf:RDF>\n'
              '</x:xmpmeta>\n'
              '<?xpacket end="w"?>\n').encode("utf-8")

# Characters XML 1.0 cannot hold, and the other control characters, which no keyword needs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class XmpError(AltclipError):
    """A sidecar that is not a well-formed XMP packet; it is left as it is."""

    exit_code = 3


def keyword_problem(keyword: str) -> str | None:
    """Why a keyword (or a root) cannot be written, or None: it is empty, has a control character,
    or holds | or /, which the hierarchical fields read as a level. (<, & and " are escaped.)"""
    if not keyword.strip():
        return "is empty"
    if _CONTROL.search(keyword):
        return "holds a control character"
    for sep in "|/":
        if sep in keyword:
            return f"holds {sep!r}, which photo managers read as a level of the keyword tree"
    return None


@dataclass
class Packet:
    """A parsed XMP packet: the element tree and the text around it."""

    root: ET.Element
    before: str  # the text before the root element (XML declaration, <?xpacket begin?>)
    after: str  # the text after it (padding, <?xpacket end?>)
    prefixes: dict[str, str]  # prefix -> namespace, as the packet declares them

    @classmethod
    def parse(cls, data: bytes, name: str = "sidecar") -> "Packet":
        """Raises XmpError naming `name` when data is not well-formed XML holding an rdf:RDF."""
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise XmpError(f"{name} is not UTF-8 XML; it is left as it is",
                           hint="repair or remove that sidecar, then run again") from None
        builder = _Builder()
        try:
            parser = ET.XMLParser(target=builder)
            parser.feed(text)
            root = parser.close()
        except ET.ParseError as exc:
            raise XmpError(f"{name} is not well-formed XML ({exc}); it is left as it is",
                           hint="repair or remove that sidecar, then run again") from None
        if _rdf(root) is None:
            raise XmpError(f"{name} holds no rdf:RDF, so it is not an XMP packet; it is left as it is",
                           hint="repair or remove that sidecar, then run again")
        start, end = _root_span(text)
        return cls(root, text[:start], text[end:], builder.prefixes)

    def owned(self, root_name: str) -> list[str]:
        """The keywords under root_name, in the order the hierarchical fields hold them."""
        out: list[str] = []
        for prop, _kind, sep in FIELDS[1:]:
            for item in self._items(prop):
                level, _, rest = item.partition(sep)
                if level == root_name and rest and rest not in out:
                    out.append(rest)
        return out

    def set_owned(self, root_name: str, keywords: list[str]) -> bool:
        """Make `keywords` the ones under root_name (an empty list removes them); True when the
        packet changed. A flat keyword that the root gave up stays in dc:subject while another
        hierarchical keyword still ends in it."""
        old = self.owned(root_name)
        dropped = [k for k in old if k not in keywords]
        changed = False
        for prop, kind, sep in FIELDS[1:]:
            items = self._items(prop)
            kept = [i for i in items if i.partition(sep)[0] != root_name or not i.partition(sep)[2]]
            want = kept + [f"{root_name}{sep}{k}" for k in keywords]
            changed |= self._set_items(prop, kind, items, want)
        leaves = {i.rpartition(sep)[2] for prop, _k, sep in FIELDS[1:] for i in self._items(prop)}
        prop, kind, _sep = FIELDS[0]
        flat = self._items(prop)
        want = [k for k in flat if k not in dropped or k in leaves]
        want += [k for k in keywords if k not in want]
        changed |= self._set_items(prop, kind, flat, want)
        return changed

    def is_empty_and_ours(self) -> bool:
        """True for a packet altclip created that now holds no property at all."""
        if self.root.get(f"{{{X}}}xmptk") != TOOLKIT:
            return False
        rdf = _rdf(self.root)
        for desc in rdf:
            if not isinstance(desc.tag, str):
                continue
            if desc.tag != f"{{{RDF}}}Description" or len(desc) or [a for a in desc.attrib if a != f"{{{RDF}}}about"]:
                return False
        return True

    def serialise(self) -> bytes:
        for prefix, uri in {**PREFIXES, **self.prefixes}.items():
            if prefix and not re.fullmatch(r"ns\d+", prefix) and prefix != "xml":
                ET.register_namespace(prefix, uri)
        body = ET.tostring(self.root, encoding="unicode")
        return (self.before + body + self.after).encode("utf-8")

    # -- the rdf:li items of one property --------------------------------------------------------

    def _properties(self, prop: str) -> list[ET.Element]:
        return [el for desc in _descriptions(self.root) for el in desc if el.tag == prop]

    def _items(self, prop: str) -> list[str]:
        return [li.text or "" for el in self._properties(prop) for li in _lis(el)]

    def _set_items(self, prop: str, kind: str, have: list[str], want: list[str]) -> bool:
        """Give the property the items `want` (have: its items now), keeping the rdf:li elements
        of the items that stay, with their attributes and layout; False when nothing changes.
        The order of items is not a change: photo managers treat these lists as sets."""
        if sorted(have) == sorted(want):
            return False
        elements = self._properties(prop)
        if not want:
            for el in elements:
                _remove(_parent(self.root, el), el)
            return True
        if not elements:
            el = ET.Element(prop)
            _append(self.root, _descriptions(self.root)[0], el)
            _append(self.root, el, ET.Element(f"{{{RDF}}}{kind}"))
            elements = [el]
        first, *others = elements
        for el in others:  # a property given twice is one list
            for li in list(_lis(el)):
                _append(self.root, _container(first), li)
            _remove(_parent(self.root, el), el)
        box = _container(first)
        if box is None:
            box = ET.Element(f"{{{RDF}}}{kind}")
            _append(self.root, first, box)
        remaining = list(want)
        for li in list(_lis(first)):
            if (li.text or "") in remaining:
                remaining.remove(li.text or "")
            else:
                _remove(box, li)
        for item in remaining:
            li = ET.Element(f"{{{RDF}}}li")
            li.text = item
            _append(self.root, box, li)
        return True


class _Builder(ET.TreeBuilder):
    """The element tree with comments and processing instructions, and the namespace prefixes the
    packet declares (prefix -> namespace; the first declaration of a prefix wins)."""

    def __init__(self):
        super().__init__(insert_comments=True, insert_pis=True)
        self.prefixes: dict[str, str] = {}

    def start_ns(self, prefix: str, uri: str) -> None:
        self.prefixes.setdefault(prefix, uri)


def _rdf(root: ET.Element) -> ET.Element | None:
    """The rdf:RDF element: the root itself, or below x:xmpmeta."""
    if root.tag == f"{{{RDF}}}RDF":
        return root
    return root.find(f".//{{{RDF}}}RDF")


def _descriptions(root: ET.Element) -> list[ET.Element]:
    """The rdf:Description elements, one created when there is none."""
    rdf = _rdf(root)
    found = [d for d in rdf if d.tag == f"{{{RDF}}}Description"]
    if not found:
        desc = ET.Element(f"{{{RDF}}}Description", {f"{{{RDF}}}about": ""})
        _append(root, rdf, desc)
        found = [desc]
    return found


def _container(prop: ET.Element) -> ET.Element | None:
    for kind in ("Bag", "Seq", "Alt"):
        box = prop.find(f"{{{RDF}}}{kind}")
        if box is not None:
            return box
    return None


def _lis(prop: ET.Element) -> list[ET.Element]:
    box = _container(prop)
    return [] if box is None else box.findall(f"{{{RDF}}}li")


def _parent(root: ET.Element, child: ET.Element) -> ET.Element:
    return next(p for p in root.iter() if any(c is child for c in p))


def _indent_of(root: ET.Element, el: ET.Element) -> str:
    """The indentation of el's start tag (the whitespace after the last newline before it)."""
    if el is root:
        return ""
    parent = _parent(root, el)
    kids = list(parent)
    i = next(n for n, c in enumerate(kids) if c is el)
    before = parent.text if i == 0 else kids[i - 1].tail
    return (before or "").rpartition("\n")[2] if before and "\n" in before else _indent_of(root, parent) + " "


def _append(root: ET.Element, parent: ET.Element, child: ET.Element) -> None:
    """Append child as parent's last element, on a line of its own, indented one more than parent."""
    inner = _indent_of(root, parent) + " "
    kids = list(parent)
    if kids:
        child.tail = kids[-1].tail
        kids[-1].tail = "\n" + inner
    else:
        parent.text = "\n" + inner
        child.tail = "\n" + inner[:-1]
    parent.append(child)


def _remove(parent: ET.Element, child: ET.Element) -> None:
    """Remove child, keeping the whitespace that closes the parent."""
    kids = list(parent)
    i = next(n for n, c in enumerate(kids) if c is child)
    if i == len(kids) - 1 and i > 0:
        kids[i - 1].tail = child.tail
    parent.remove(child)


def _root_span(text: str) -> tuple[int, int]:
    """(start, end) of the root element in the packet's text: what lies outside is kept as it is."""
    pos = 0
    while True:
        lt = text.index("<", pos)
        if text.startswith("<?", lt):
            pos = text.index("?>", lt) + 2
        elif text.startswith("<!--", lt):
            pos = text.index("-->", lt) + 3
        elif text.startswith("<!", lt):
            pos = text.index(">", lt) + 1
        else:
            break
    start = lt
    name = re.match(r"<([^\s/>]+)", text[start:]).group(1)
    close = text.rfind(f"</{name}")
    end = text.index(">", close) + 1 if close >= 0 else text.index("/>", start) + 2
    return start, end
