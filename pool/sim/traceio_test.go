package sim

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func gzipped(t *testing.T, s string) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	if _, err := zw.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestOpenTrace(t *testing.T) {
	const csv = "submit_s,duration_s\n0.000,12.5\n3.250,60.0\n"
	gz := gzipped(t, csv)
	for _, tc := range []struct {
		name    string
		content []byte
		want    string
	}{
		{"trace.csv", []byte(csv), csv},
		{"trace.csv.gz", gz, csv},
		// The content decides: a gzipped file without the suffix reads too.
		{"trace-gzipped.csv", gz, csv},
		// Two members, as `cat a.gz b.gz` makes, read as gunzip reads them.
		{"two.csv.gz", append(gzipped(t, csv), gzipped(t, "4.000,1.0\n")...), csv + "4.000,1.0\n"},
		{"empty.csv", nil, ""},
		{"one-byte.csv", []byte("\x1f"), "\x1f"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), tc.name)
			if err := os.WriteFile(path, tc.content, 0o644); err != nil {
				t.Fatal(err)
			}
			rc, err := OpenTrace(path)
			if err != nil {
				t.Fatalf("OpenTrace: %v", err)
			}
			got, err := io.ReadAll(rc)
			if err != nil {
				t.Fatalf("reading: %v", err)
			}
			if err := rc.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if string(got) != tc.want {
				t.Fatalf("read %q, want %q", got, tc.want)
			}
		})
	}
}

func TestOpenTraceErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, content []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, content, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}

	missing := filepath.Join(dir, "missing.csv")
	if _, err := OpenTrace(missing); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: error %v, want one naming it, wrapping fs.ErrNotExist", err)
	}

	plain := write("plain.csv.gz", []byte("submit_s,duration_s\n"))
	if _, err := OpenTrace(plain); err == nil || err.Error() != "reading trace "+plain+": named .gz but not gzip-compressed" {
		t.Errorf("plain text named .gz: error %v", err)
	}

	badHeader := write("bad-header.csv.gz", []byte{0x1f, 0x8b, 0, 0, 0})
	if _, err := OpenTrace(badHeader); err == nil || !strings.HasPrefix(err.Error(), "reading trace "+badHeader+": gunzipping: ") {
		t.Errorf("broken gzip header: error %v", err)
	}

	// Cut short, as an interrupted download is: the error comes from
	// Read, names the file, and is not mistaken for the end of the trace.
	whole := gzipped(t, strings.Repeat("1.000,2.0\n", 1000))
	truncated := write("truncated.csv.gz", whole[:len(whole)-6])
	rc, err := OpenTrace(truncated)
	if err != nil {
		t.Fatalf("OpenTrace: %v", err)
	}
	defer func() { _ = rc.Close() }() // only read here
	_, err = io.ReadAll(rc)
	if !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), truncated) {
		t.Errorf("truncated gzip: error %v, want one naming the file, wrapping io.ErrUnexpectedEOF", err)
	}
}
