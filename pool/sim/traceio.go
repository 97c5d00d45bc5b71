package sim

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// OpenTrace opens a trace file for reading, gunzipping it when it is
// gzip-compressed: the shipped traces over a megabyte are kept as .csv.gz.
// The content decides, not the name, since a CSV never starts with gzip's
// magic bytes; a file named *.gz that is not gzip is an error, as it is
// surely not what its owner meant.
func OpenTrace(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening trace: %w", err)
	}
	br := bufio.NewReader(f)
	magic, err := br.Peek(2)
	if err != nil && !errors.Is(err, io.EOF) {
		_ = f.Close() // the read error is the one to report
		return nil, fmt.Errorf("reading trace %s: %w", path, err)
	}
	if len(magic) < 2 || magic[0] != 0x1f || magic[1] != 0x8b {
		if strings.HasSuffix(path, ".gz") {
			_ = f.Close()
			return nil, fmt.Errorf("reading trace %s: named .gz but not gzip-compressed", path)
		}
		return readCloser{br, f}, nil
	}
	zr, err := gzip.NewReader(br)
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("reading trace %s: gunzipping: %w", path, err)
	}
	// A file of several gzip members (cat a.gz b.gz) reads as one trace,
	// as gunzip reads it.
	return gzipFile{zr, f, path}, nil
}

type readCloser struct {
	io.Reader
	io.Closer
}

// gzipFile says which file a gunzipping error comes from (a truncated
// file, a checksum that does not match at the end) and closes the file
// beneath.
type gzipFile struct {
	zr   *gzip.Reader
	f    *os.File
	path string
}

func (g gzipFile) Read(p []byte) (int, error) {
	n, err := g.zr.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		err = fmt.Errorf("reading trace %s: gunzipping: %w", g.path, err)
	}
	return n, err
}

func (g gzipFile) Close() error {
	return errors.Join(g.zr.Close(), g.f.Close())
}
