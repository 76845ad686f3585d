"""Knowledge-base readers and chunker: each format, bad inputs, chunk boundaries, overlap, headings."""
import itertools
import json

import pytest

from kuaida.errors import IngestError, InvalidArgumentError
from kuaida.knowledge import parse
from kuaida.knowledge.chunk import ChunkConfig, chunk_sections, indexed_text
from kuaida.knowledge.embed import wordpiece_tokenizer
from kuaida.knowledge.parse import Section, read_document


def n_tokens(text):
    return len(wordpiece_tokenizer().encode(text, add_special_tokens=False).ids)


def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def minimal_pdf(pages):
    """A valid PDF with one text line per page (Helvetica), offsets computed for the xref table."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None,
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = "%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1")


def test_markdown_heading_paths_and_code_fences(tmp_path):
    md = ("Intro text.\n\n# Setup\nPlug it in.\n\n## Wi-Fi\nJoin your network.\n\n```\n# not a heading\n```\n\n"
          "## Ethernet\nUse the cable.\n\nTroubleshooting\n===============\nRestart it.\n")
    doc = read_document(write(tmp_path, "setup.md", md))
    assert [s.heading for s in doc.sections] == ["", "Setup", "Setup > Wi-Fi", "Setup > Ethernet", "Troubleshooting"]
    assert "# not a heading" in doc.sections[2].text
    assert doc.bytes == len(md.encode()) and len(doc.sha256) == 64


def test_html_strips_scripts_and_keeps_headings(tmp_path):
    html = ("<html><head><title>T</title><style>p {color: red}</style></head><body>"
            "<h1>Reset</h1><p>Hold the <b>pin</b> &amp; wait.</p><script>alert('x')</script>"
            "<h2>Factory reset</h2><div>Twelve seconds.</div><h1>Billing</h1><p>Monthly.</p>"
            "<table><tr><th>Plan</th><th>Price</th></tr><tr><td>Plus</td><td>$4.99</td></tr></table></body></html>")
    doc = read_document(write(tmp_path, "help.html", html))
    assert [(s.heading, s.text) for s in doc.sections] == [
        ("Reset", "Hold the pin & wait."), ("Reset > Factory reset", "Twelve seconds."),
        ("Billing", "Monthly.\n\nPlan | Price\n\nPlus | $4.99")]


def test_pdf_one_section_per_page(tmp_path):
    doc = read_document(write(tmp_path, "manual.pdf", minimal_pdf(["Hello hub owner", "Second page text"])))
    assert [(s.heading, s.text) for s in doc.sections] == [("page 1", "Hello hub owner"),
                                                            ("page 2", "Second page text")]


def test_faq_jsonl_bad_lines_reported_and_skipped(tmp_path):
    lines = [json.dumps({"question": "How do I reset?", "answer": "Hold the pin."}), "{not json",
             json.dumps({"question": "No answer"}), "", json.dumps({"question": "Price?", "answer": "99 EUR"})]
    doc = read_document(write(tmp_path, "faq.jsonl", "\n".join(lines)))
    assert [(s.heading, s.text, s.atomic) for s in doc.sections] == [
        ("How do I reset?", "Hold the pin.", True), ("Price?", "99 EUR", True)]
    assert [p.split(":")[0] for p in doc.problems] == ["line 2", "line 3"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.md", "  \n\n", "empty"),
    ("blob.txt", b"\x00\x01\x02binary" * 10, "binary"),
    ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "not a readable PDF"),
    ("image.png", b"\x89PNG....", "unsupported file type '.png'"),
    ("faq.jsonl", "{bad\n[1, 2]\n", "no usable FAQ line"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, name, content, message):
    with pytest.raises(IngestError, match=message):
        read_document(write(tmp_path, name, content))


def test_huge_file_refused_while_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(parse, "MAX_FILE_BYTES", 3 << 20)
    path = write(tmp_path, "big.txt", b"word " * (1 << 20))  # 5 MB
    with pytest.raises(IngestError, match="over the 3 MB limit"):
        read_document(path)


def test_chunks_respect_budget_overlap_and_word_boundaries():
    sentences = [f"Sentence number {i} talks about the hub and its {i * 7} settings." for i in range(60)]
    section = Section("Guide > Settings", " ".join(sentences))
    config = ChunkConfig(chunk_tokens=64, overlap=16)
    chunks = chunk_sections([section], config)
    assert len(chunks) > 5
    assert all(c.heading == "Guide > Settings" for c in chunks)
    assert all(n_tokens(c.text) <= 64 for c in chunks)
    words = section.text.split()
    for a, b in itertools.pairwise(chunks):
        assert a.text.split()[-1] in words and b.text.split()[0] in words  # no word cut in two
        assert b.text[:20] in a.text  # the next chunk starts inside this one: overlap
    assert chunks[0].text.startswith("Sentence number 0") and chunks[-1].text.endswith("413 settings.")
    # Cuts prefer sentence ends: most chunks end with a full stop.
    assert sum(c.text.endswith(".") for c in chunks) >= len(chunks) - 1


def test_no_overlap_covers_text_exactly_once():
    text = " ".join(f"w{i}" for i in range(500))
    chunks = chunk_sections([Section("", text)], ChunkConfig(chunk_tokens=40, overlap=0))
    assert " ".join(c.text for c in chunks).split() == text.split()


def test_chunks_never_cross_sections_and_headings_shrink_the_budget():
    long_heading = " > ".join(["A very long heading about configuration"] * 12)
    sections = [Section("Short", "alpha " * 300), Section(long_heading, "beta " * 300), Section("Tiny", "gamma")]
    chunks = chunk_sections(sections, ChunkConfig(chunk_tokens=200, overlap=40))
    assert {c.heading for c in chunks} == {"Short", long_heading, "Tiny"}
    for c in chunks:
        assert len(set(c.text.split())) == 1  # one section's words only
        assert n_tokens(indexed_text(c.heading, c.text)) <= 254 or n_tokens(c.text) <= 100
    assert max(n_tokens(c.text) for c in chunks if c.heading == long_heading) < 200


def test_faq_pairs_are_one_chunk_each():
    chunks = chunk_sections([Section("Q?", "word " * 400, atomic=True)])
    assert len(chunks) == 1 and chunks[0].heading == "Q?"


@pytest.mark.parametrize("tokens, overlap", [(8, 0), (300, 0), (100, 51), (100, -1)])
def test_chunk_config_validation(tokens, overlap):
    with pytest.raises(InvalidArgumentError):
        ChunkConfig(tokens, overlap)
