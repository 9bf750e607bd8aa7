from qtrap_proxy.sse import SSESplitter, data_of


def test_events_split_across_reads() -> None:
    s = SSESplitter()
    assert s.feed(b'data: {"a"') == []
    assert s.feed(b": 1}\n") == []
    assert s.feed(b"\ndata: [DONE]\n\ndata: x") == [b'data: {"a": 1}', b"data: [DONE]"]
    assert s.pending == b"data: x"


def test_crlf_and_split_crlf() -> None:
    s = SSESplitter()
    assert s.feed(b"data: 1\r\n\r") == []
    assert s.feed(b"\ndata: 2\r\n\r\n") == [b"data: 1", b"data: 2"]
    assert s.pending == b""


def test_data_of() -> None:
    assert data_of(b"data: {}") == b"{}"
    assert data_of(b"data:{}") == b"{}"
    assert data_of(b'event: error\ndata: {"x":1}') == b'{"x":1}'
    assert data_of(b": keep-alive comment") is None
    assert data_of(b"data: a\ndata: b") == b"a\nb"
