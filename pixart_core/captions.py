"""Prompt preprocessing before T5, as the references do it: diffusers' caption cleaning, lowercase, or strip only.

`clean_caption` follows diffusers' `PixArtAlphaPipeline._clean_caption` (itself DeepFloyd IF's, Apache-2.0), rule
for rule, so a prompt tokenizes as diffusers' `PixArtSigmaPipeline(clean_caption=True)` (its default) tokenizes it.
"""
from __future__ import annotations

import html
import re
import urllib.parse as ul

# Cleaning modes (ids; Text Encode shows its own labels for them)
DIFFUSERS = "diffusers"  # diffusers' caption cleaning, twice, as PixArtSigmaPipeline(clean_caption=True)
LOWERCASE = "lowercase"  # lowercase and strip: diffusers with clean_caption=False
NONE = "none"  # strip only: the original PixArt-Σ inference script
MODES = (DIFFUSERS, LOWERCASE, NONE)
DEFAULT_MODE = DIFFUSERS
INSTALL_HINT = (
    "caption_cleaning 'diffusers' needs beautifulsoup4 and ftfy. Install them into ComfyUI's Python with "
    "`python -m pip install beautifulsoup4 ftfy`, restart ComfyUI, or choose caption_cleaning 'lowercase'."
)

_BAD_PUNCT = re.compile(r"[" + "#®•©™&@·º½¾¿¡§~" + r"\)\(\]\[\}\{\|" + "\\" + r"\/\*" + r"]{1,}")
_URL_RULES = (
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
)
# CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs (ext. A), Yijing hexagrams.
_CJK = (r"[\u31c0-\u31ef]+", r"[\u31f0-\u31ff]+", r"[\u3200-\u32ff]+", r"[\u3300-\u33ff]+", r"[\u3400-\u4dbf]+",
        r"[\u4dc0-\u4dff]+", r"[\u4e00-\u9fff]+")
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
           r"\uFE58\uFE63\uFF0D]+")
# (pattern, replacement) applied in order after the HTML, @-name, CJK and dash rules.
_RULES_BEFORE_FTFY = (
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", r'"'),
    (r"[\.]{2,}", r" "),
    (_BAD_PUNCT, r" "),
    (r"\s+\.\s+", r" "),
)
_RULES_AFTER_FTFY = (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes like 1920x1080
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
)


def _imports():
    try:
        import ftfy
        from bs4 import BeautifulSoup
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e
    return BeautifulSoup, ftfy


def clean_caption(caption: str) -> str:
    """One pass of diffusers' caption cleaning (URLs, HTML, @names, CJK, hashtags, file names, odd punctuation)."""
    BeautifulSoup, ftfy = _imports()
    caption = ul.unquote_plus(str(caption)).strip().lower()
    caption = re.sub("<person>", "person", caption)
    for rule in _URL_RULES:
        caption = re.sub(rule, "", caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = re.sub(r"@[\w\d]+\b", "", caption)
    for rule in _CJK:
        caption = re.sub(rule, "", caption)
    caption = re.sub(_DASHES, "-", caption)
    for pattern, repl in _RULES_BEFORE_FTFY:
        caption = re.sub(pattern, repl, caption)
    if len(re.findall(r"(?:\-|\_)", caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = re.sub(r"(?:\-|\_)", " ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption)))
    for pattern, repl in _RULES_AFTER_FTFY:
        caption = re.sub(pattern, repl, caption)
    return caption.strip()


def preprocess(prompt: str, mode: str = DEFAULT_MODE) -> str:
    """The text T5 tokenizes: `diffusers` cleans twice (as diffusers does), `lowercase` lowercases and strips
    (diffusers without cleaning), `none` only strips (the original PixArt-Σ inference script)."""
    if mode == DIFFUSERS:
        return clean_caption(clean_caption(prompt))
    if mode == LOWERCASE:
        return prompt.lower().strip()
    if mode == NONE:
        return prompt.strip()
    raise ValueError(f"caption_cleaning {mode!r} is not one of {MODES}.")
