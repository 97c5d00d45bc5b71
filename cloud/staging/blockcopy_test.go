package staging_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/staging"
)

func TestBlockCopy(t *testing.T) {
	srcEnv, dstEnv := twoServers(t)
	src, dst := srcEnv.dial(t), dstEnv.dial(t)
	dir := t.TempDir()
	// Not a multiple of dd's block size, so the last block is partial.
	data := make([]byte, 16<<20+12345)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	from := filepath.Join(dir, "disk image")
	must(t, os.WriteFile(from, data, 0o600))
	to := filepath.Join(dir, "copy's image")
	// A longer file there must end up the same length as the source.
	must(t, os.WriteFile(to, make([]byte, 20<<20), 0o600))

	var progress bytes.Buffer
	n, err := staging.BlockCopy(testContext(t), src, from, false, dst, to, false, &progress)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len(data)) {
		t.Errorf("copied %d bytes, want %d", n, len(data))
	}
	got, err := os.ReadFile(to)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("the copy differs (%d bytes, want %d)", len(got), len(data))
	}
	if !strings.Contains(progress.String(), "16.0 MiB copied\n") {
		t.Errorf("progress %q does not give the total", progress.String())
	}
}

func TestBlockCopySudo(t *testing.T) {
	needSudo(t)
	srcEnv, dstEnv := twoServers(t)
	src, dst := srcEnv.dial(t), dstEnv.dial(t)
	dir := t.TempDir()
	data := []byte("a small device")
	must(t, os.WriteFile(filepath.Join(dir, "from"), data, 0o600))
	if _, err := staging.BlockCopy(testContext(t), src, filepath.Join(dir, "from"), true, dst, filepath.Join(dir, "to"), true, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "to")); err != nil || !bytes.Equal(got, data) {
		t.Errorf("copied %q, %v", got, err)
	}
}

func TestBlockCopyFails(t *testing.T) {
	srcEnv, dstEnv := twoServers(t)
	src, dst := srcEnv.dial(t), dstEnv.dial(t)
	dir := t.TempDir()
	from := filepath.Join(dir, "from")
	must(t, os.WriteFile(from, make([]byte, 1<<20), 0o600))

	for _, tc := range []struct {
		name, from, to string
		want           string
	}{
		{"missing source", filepath.Join(dir, "missing"), filepath.Join(dir, "to1"), "reading " + filepath.Join(dir, "missing")},
		{"unwritable destination", from, filepath.Join(dir, "no such dir", "to"), "writing " + filepath.Join(dir, "no such dir", "to")},
		// Reading a directory fails after dd started writing.
		{"source is a directory", dir, filepath.Join(dir, "to3"), "reading " + dir},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := staging.BlockCopy(testContext(t), src, tc.from, false, dst, tc.to, false, nil)
			var exitErr *staging.ExitError
			if !errors.As(err, &exitErr) || !strings.Contains(err.Error(), tc.want) || exitErr.Stderr == "" {
				t.Errorf("got %v, want the failing dd's ExitError while %s", err, tc.want)
			}
		})
	}

	_, err := staging.BlockCopy(testContext(t), src, "", false, dst, "/x", false, nil)
	if err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("empty device: got %v", err)
	}
}

func TestBlockCopyCancel(t *testing.T) {
	srcEnv, dstEnv := twoServers(t)
	src, dst := srcEnv.dial(t), dstEnv.dial(t)
	to := filepath.Join(t.TempDir(), "to")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// /dev/zero never ends; the first progress report cancels the copy.
	progress := writerFunc(func(p []byte) (int, error) {
		cancel()
		return len(p), nil
	})
	_, err := staging.BlockCopy(ctx, src, "/dev/zero", false, dst, to, false, progress)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// Neither dd is left running on its server.
	deadline := time.Now().Add(10 * time.Second)
	for processRunning(t, "dd if=/dev/zero bs=4M status=none") || len(processesMentioning(t, to)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("dd still runs after cancelling: %v", processesMentioning(t, "dd "))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Both connections still work.
	for _, c := range []*staging.Client{src, dst} {
		if out, err := c.Output(testContext(t), "echo alive"); err != nil || string(out) != "alive\n" {
			t.Errorf("after cancelling: %q, %v", out, err)
		}
	}
}
