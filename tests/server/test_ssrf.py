"""Chat image URLs: no fetching unless the host is allow-listed, and never a redirect."""
import asyncio
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rfserve.server.chat.config import ChatConfig
from rfserve.server.chat.messages import check_remote
from rfserve.server.chat.routes import _fetch
from rfserve.server.errors import APIError

FIELD = "messages[0].content[0].image_url.url"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/health", "http://localhost/x.png", "file:///etc/passwd",
                                 "gopher://127.0.0.1:70/", "http://169.254.169.254/latest/meta-data/",
                                 "https://example.com/a.png"])
def test_remote_urls_are_refused_without_an_allow_list(url):
    with pytest.raises(APIError) as err:
        check_remote(url, FIELD, ChatConfig(slots=1))
    assert err.value.status == 400 and err.value.param == FIELD


def test_only_allow_listed_hosts_and_http_schemes_pass():
    cfg = ChatConfig(slots=1, image_hosts=frozenset({"images.example.com"}))
    check_remote("https://images.example.com/cat.png", FIELD, cfg)
    for url in ("file://images.example.com/etc/passwd", "https://other.example.com/cat.png"):
        with pytest.raises(APIError):
            check_remote(url, FIELD, cfg)


def test_redirects_are_not_followed():
    hits = []

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/internal")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/img.png"
        with pytest.raises(APIError) as err:
            asyncio.run(_fetch(url, FIELD, 1 << 20))
        assert "302" in err.value.message and hits == ["/img.png"]
    finally:
        server.shutdown()
