package staging_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/staging"
)

func TestShellCommand(t *testing.T) {
	c := newTestEnv(t).dial(t)
	var out bytes.Buffer
	term := staging.Terminal{Term: "xterm-256color", Width: 132, Height: 43}
	err := c.Shell(testContext(t), `tty; echo "TERM=$TERM"; stty size; echo to-stderr >&2; exit 3`, term, nil, &out, nil)
	var exitErr *staging.ExitError
	if !errors.As(err, &exitErr) || exitErr.Status != 3 {
		t.Fatalf("got %v, want an ExitError with status 3", err)
	}
	// A terminal ends lines with \r\n and carries stderr too.
	for _, want := range []string{"/dev/pts/", "TERM=xterm-256color\r\n", "43 132\r\n", "to-stderr\r\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output %q lacks %q", out.String(), want)
		}
	}

	out.Reset()
	if err := c.Shell(testContext(t), "echo fine", staging.Terminal{}, nil, &out, nil); err != nil {
		t.Fatal(err)
	}
	if out.String() != "fine\r\n" {
		t.Errorf("output %q, want \"fine\\r\\n\"", out.String())
	}
}

func TestShellInteractive(t *testing.T) {
	c := newTestEnv(t).dial(t)
	stdin, typing := io.Pipe()
	defer func() { _ = typing.Close() }()
	resize := make(chan staging.Terminal)
	var out syncBuffer
	errc := make(chan error, 1)
	go func() {
		errc <- c.Shell(testContext(t), "", staging.Terminal{Term: "vt100"}, stdin, &out, resize)
	}()

	resize <- staging.Terminal{Width: 100, Height: 40}
	// The window change and the typing travel separately; the shell
	// waits until it sees the new size. The arithmetic makes the marker
	// appear only when the shell runs the line, not when it echoes it.
	_, _ = io.WriteString(typing, `while [ "$(stty size)" != "40 100" ]; do sleep 0.01; done; echo "size-$((6*7))"; echo "term-$TERM"; exit 5`+"\n")
	err := <-errc
	var exitErr *staging.ExitError
	if !errors.As(err, &exitErr) || exitErr.Status != 5 || exitErr.Command != "login shell" {
		t.Fatalf("got %v, want the login shell's ExitError with status 5", err)
	}
	for _, want := range []string{"size-42", "term-vt100"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output %q lacks %q", out.String(), want)
		}
	}
}

func TestShellCancel(t *testing.T) {
	c := newTestEnv(t).dial(t)
	marker := "sleep 30." + strconv.Itoa(int(time.Now().UnixNano()%1000)+2000)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	errc := make(chan error, 1)
	go func() { errc <- c.Shell(ctx, "echo started; "+marker, staging.Terminal{}, nil, &out, nil) }()
	for !strings.Contains(out.String(), "started") {
		select {
		case err := <-errc:
			t.Fatalf("the command ended early: %v, output %q", err, out.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// Closing the terminal hangs up what runs in it, even for root.
	deadline := time.Now().Add(5 * time.Second)
	for processRunning(t, marker) {
		if time.Now().After(deadline) {
			t.Fatalf("%q still runs after cancelling", marker)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestShellBadSize(t *testing.T) {
	c := newTestEnv(t).dial(t)
	err := c.Shell(testContext(t), "true", staging.Terminal{Width: -1}, nil, io.Discard, nil)
	if err == nil || !strings.Contains(err.Error(), "negative") {
		t.Errorf("got %v, want an error about the size", err)
	}
}

// syncBuffer is a bytes.Buffer that the ssh package may write while the
// test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
