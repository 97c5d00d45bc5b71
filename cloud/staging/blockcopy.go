package staging

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/hangar-ci/hangar/internal/shell"
)

// blockSize is dd's block size: large enough that ssh, not dd's system
// calls, limits the speed.
const blockSize = "4M"

// progressStep is how often BlockCopy reports progress, in bytes.
const progressStep = 64 << 20

// errWriterEnded stops the reading side when the writing side has ended
// before taking all of the data.
var errWriterEnded = errors.New("the writing dd ended before the reading dd")

// BlockCopy copies srcDevice on src byte for byte to dstDevice on dst: dd
// reads on one server, the bytes pass through this process, and dd writes
// them on the other, which syncs them to the device before it exits. Either
// side runs dd with sudo -n when asked. It returns the number of bytes
// copied. A failure on either side stops both; the error is the one that
// failed first. progress, when not nil, gets a line now and then.
//
// dstDevice must be at least as large as srcDevice; a regular file there is
// replaced.
func BlockCopy(ctx context.Context, src *Client, srcDevice string, srcSudo bool, dst *Client, dstDevice string, dstSudo bool, progress io.Writer) (int64, error) {
	what := fmt.Sprintf("copying %s:%s to %s:%s", src.addr, srcDevice, dst.addr, dstDevice)
	for _, d := range []string{srcDevice, dstDevice} {
		if d == "" || strings.IndexByte(d, 0) >= 0 {
			return 0, fmt.Errorf("%s: device %q is empty or holds a NUL byte", what, d)
		}
	}
	// status=none keeps dd's transfer statistics out of stderr, which
	// should hold only a reason for failing.
	read := "dd if=" + shell.Quote(srcDevice) + " bs=" + blockSize + " status=none"
	// iflag=fullblock keeps blocks whole although ssh delivers pieces;
	// conv=fsync makes dd's exit status cover getting the data onto the
	// device, not only into the page cache.
	write := "dd of=" + shell.Quote(dstDevice) + " bs=" + blockSize + " iflag=fullblock conv=fsync status=none"
	if srcSudo {
		read = "sudo -n " + read
	}
	if dstSudo {
		write = "sudo -n " + write
	}

	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		cancel()
	}

	pr, pw := io.Pipe()
	counter := &countingWriter{w: pw, progress: progress}
	srcDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer close(srcDone)
		err := src.Run(ctx, read, nil, counter, nil)
		if err != nil {
			fail(fmt.Errorf("reading %s on %s: %w", srcDevice, src.addr, err))
			pw.CloseWithError(err)
			return
		}
		_ = pw.Close() // the writing dd sees the end of its input
	}()
	go func() {
		defer wg.Done()
		err := dst.Run(ctx, write, pr, nil, nil)
		// Unblocks the reading side, which would otherwise wait forever
		// for someone to take its next block.
		pr.CloseWithError(errWriterEnded)
		if err != nil {
			fail(fmt.Errorf("writing %s on %s: %w", dstDevice, dst.addr, err))
			return
		}
		select {
		case <-srcDone:
		default:
			fail(fmt.Errorf("writing %s on %s: %w", dstDevice, dst.addr, errWriterEnded))
		}
	}()
	wg.Wait()

	n := counter.total()
	if progress != nil {
		_, _ = fmt.Fprintf(progress, "\r%s copied\n", humanBytes(n))
	}
	if err := parent.Err(); err != nil {
		return n, fmt.Errorf("%s: %w", what, err)
	}
	if firstErr != nil {
		return n, fmt.Errorf("%s: %w", what, firstErr)
	}
	return n, nil
}

// countingWriter counts the bytes it passes on and reports progress every
// progressStep bytes.
type countingWriter struct {
	w        io.Writer
	progress io.Writer
	mu       sync.Mutex
	n        int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.mu.Lock()
	before := c.n
	c.n += int64(n)
	after := c.n
	c.mu.Unlock()
	if c.progress != nil && before/progressStep != after/progressStep {
		_, _ = fmt.Fprintf(c.progress, "\r%s copied", humanBytes(after))
	}
	return n, err
}

func (c *countingWriter) total() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// humanBytes writes n in binary units, as "1.5 GiB".
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
