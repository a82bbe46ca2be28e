import socket

import pytest

from data_tools import fetch
from data_tools.records import DataError


def test_offline_gives_a_clear_message(tmp_path, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: the connection is refused, as on an offline machine
    monkeypatch.setattr(fetch, "API", f"http://127.0.0.1:{port}/uniprotkb/search")
    out = tmp_path / "slice.dat.gz"
    with pytest.raises(DataError) as e:
        fetch.fetch_uniprot(str(out), limit=10, timeout=5)
    assert e.value.kind == "offline" and "uniprot_sprot.dat.gz" in e.value.fix
    assert not out.exists() and not (tmp_path / "slice.dat.gz.part").exists()


def test_pages_are_written_as_a_flat_file(tmp_path, monkeypatch, sample_path):
    """Serve two pages of real flat-file text on loopback, with UniProt's Link header for paging."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    text = gzip.open(sample_path, "rt").read()
    entries = [e + "//\n" for e in text.split("//\n")[:5]]

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            page2 = "cursor=2" in self.path
            body = "".join(entries[3:] if page2 else entries[:3]).encode()
            self.send_response(200)
            if not page2:
                self.send_header("Link", f'<http://127.0.0.1:{srv.server_port}/s?cursor=2>; rel="next"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.handle_request, daemon=True)
    t.start()
    threading.Thread(target=lambda: (t.join(), srv.handle_request()), daemon=True).start()
    monkeypatch.setattr(fetch, "API", f"http://127.0.0.1:{srv.server_port}/s")
    out = tmp_path / "slice.dat.gz"
    assert fetch.fetch_uniprot(str(out), limit=5, page_size=3, timeout=10) == 5
    from data_tools.readers import read_records
    assert len(list(read_records(str(out), skip_bad=True))) == 5
    srv.server_close()
