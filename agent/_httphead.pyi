# agent/_httphead.c: the common HTTP/1.1 head in one pass (agent/http1.py holds the reference).

def parse_request_head(
    buf: bytes, pos: int, limit: int, /
) -> tuple[int, str, str, str, tuple[tuple[str, str], ...]] | None: ...
def parse_response_head(
    buf: bytes, pos: int, limit: int, /
) -> tuple[int, str, int, str, tuple[tuple[str, str], ...]] | None: ...
