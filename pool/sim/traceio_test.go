package sim

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
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

// parseShippedTrace reads a trace as `hangar simulate` must accept it: a
// header, then rows of finite, non-negative numbers sorted by submit_s,
// with a pool on every row when the header has the column. It returns the
// number of rows.
func parseShippedTrace(t *testing.T, path string) int {
	t.Helper()
	rc, err := OpenTrace(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = rc.Close() }() // only read here
	data, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	header := lines[0]
	if header != "submit_s,duration_s" && header != "submit_s,duration_s,pool" {
		t.Fatalf("%s: header %q", path, header)
	}
	fields := strings.Count(header, ",") + 1
	last := 0.0
	for i, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) != fields {
			t.Fatalf("%s:%d: %q: %d fields, want %d", path, i+2, l, len(f), fields)
		}
		submit, err1 := strconv.ParseFloat(f[0], 64)
		duration, err2 := strconv.ParseFloat(f[1], 64)
		if err := errors.Join(err1, err2); err != nil {
			t.Fatalf("%s:%d: %v", path, i+2, err)
		}
		if math.IsInf(submit, 0) || math.IsInf(duration, 0) || math.IsNaN(submit) || math.IsNaN(duration) || submit < 0 || duration <= 0 {
			t.Fatalf("%s:%d: %q: want a finite submit_s >= 0 and duration_s > 0", path, i+2, l)
		}
		if submit < last {
			t.Fatalf("%s:%d: %q: submitted before the row above", path, i+2, l)
		}
		if fields == 3 && f[2] == "" {
			t.Fatalf("%s:%d: %q: no pool", path, i+2, l)
		}
		last = submit
	}
	return len(lines) - 1
}

// TestShippedTraces: every trace under traces/ reads, is small enough to
// keep in the repository (gzipped when over a megabyte), and is described
// in traces/README.md; synthetic.csv is what the generator writes with its
// defaults, so neither can drift from the other.
func TestShippedTraces(t *testing.T) {
	readme, err := os.ReadFile("traces/README.md")
	if err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir("traces")
	if err != nil {
		t.Fatal(err)
	}
	var traces []string
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".csv") && !strings.HasSuffix(name, ".csv.gz") {
			continue
		}
		traces = append(traces, name)
		t.Run(name, func(t *testing.T) {
			info, err := e.Info()
			if err != nil {
				t.Fatal(err)
			}
			if info.Size() > 2<<20 || (info.Size() > 1<<20 && !strings.HasSuffix(name, ".gz")) {
				t.Errorf("%d bytes: a shipped trace is at most 2 MB, gzipped over 1 MB", info.Size())
			}
			if !bytes.Contains(readme, []byte("`"+name+"`")) {
				t.Errorf("traces/README.md does not describe it")
			}
			if n := parseShippedTrace(t, filepath.Join("traces", name)); n < 1000 {
				t.Errorf("%d rows: too few to judge a policy by", n)
			}
		})
	}
	for _, want := range []string{"synthetic.csv", "bitcoin-core.csv"} {
		if !slices.Contains(traces, want) {
			t.Errorf("traces/ has %v, not %s", traces, want)
		}
	}

	shipped, err := os.ReadFile("traces/synthetic.csv")
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := Generate(DefaultGenOptions(), &b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.Bytes(), shipped) {
		t.Errorf("traces/synthetic.csv (%d bytes) is not what Generate writes with DefaultGenOptions (%d bytes): regenerate it with the command in traces/README.md", len(shipped), b.Len())
	}
}
