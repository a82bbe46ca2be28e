"""A small slice of UniProtKB from its REST API, in the flat-file format the build reads."""
from __future__ import annotations

import gzip
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

from data_tools.records import DataError

API = "https://rest.uniprot.org/uniprotkb/search"
DEFAULT_QUERY = "reviewed:true AND cc_function:*"


def fetch_uniprot(out: str, limit: int = 2000, query: str = DEFAULT_QUERY, page_size: int = 500,
                  timeout: float = 60.0) -> int:
    """Page through the search endpoint (format=txt) into `out` (.gz if the name says so). Returns records."""
    url = f"{API}?{urllib.parse.urlencode({'query': query, 'format': 'txt', 'size': min(page_size, limit)})}"
    tmp = out + ".part"
    n = 0
    opener = gzip.open if out.endswith(".gz") else open
    try:
        with opener(tmp, "wb") as f:
            while url and n < limit:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    body = resp.read()
                    link = resp.headers.get("Link", "")
                entries = body.split(b"\n//\n")
                keep = [e for e in entries if e.strip()][: limit - n]
                for e in keep:
                    f.write(e.strip(b"\n") + b"\n//\n")
                n += len(keep)
                m = re.search(r'<([^>]+)>;\s*rel="next"', link)
                url = m.group(1) if m else None
                print(f"fetched {n:,} records", file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(API, f"cannot reach UniProt ({e})", kind="offline",
                        fix="this machine is offline: download uniprot_sprot.dat.gz elsewhere and pass its path") from None
    os.replace(tmp, out)
    return n
