package staging

import (
	"context"
	"errors"
	"fmt"
	"io"

	"golang.org/x/crypto/ssh"
)

// Terminal describes the terminal a Shell runs in.
type Terminal struct {
	Term   string // the TERM variable, such as "xterm-256color"; "" means "xterm"
	Width  int    // columns; 0 means 80
	Height int    // rows; 0 means 24
}

func (t Terminal) withDefaults() Terminal {
	if t.Term == "" {
		t.Term = "xterm"
	}
	t.Width = orDefault(t.Width, 80)
	t.Height = orDefault(t.Height, 24)
	return t
}

// shellName stands for the login shell in messages and errors.
const shellName = "login shell"

// Shell runs the user's login shell on the server, or cmd through it when
// cmd is not "", on a pseudo-terminal of the given type and size. stdin is
// the keyboard and stdout the screen; a terminal merges standard error into
// it. Each Terminal received from resize (which may be nil) resizes the
// terminal, as when the local window changes. A non-zero exit gives an
// *ExitError (with no Stderr). Cancelling ctx closes the terminal, which
// hangs up the shell and what runs in it.
//
// Shell does not touch the local terminal: a caller connecting a person's
// terminal puts it in raw mode first, so keys such as Ctrl-C reach the
// server instead of stopping this process. When stdin ends, the server is
// not told (a terminal has no end of input); the shell ends when told to,
// by "exit" or Ctrl-D in stdin.
func (c *Client) Shell(ctx context.Context, cmd string, term Terminal, stdin io.Reader, stdout io.Writer, resize <-chan Terminal) error {
	name := cmd
	if name == "" {
		name = shellName
	}
	if term.Width < 0 || term.Height < 0 {
		return fmt.Errorf("running %s on %s: terminal size %dx%d is negative", name, c.addr, term.Width, term.Height)
	}
	term = term.withDefaults()
	sess, err := c.conn.NewSession()
	if err != nil {
		return fmt.Errorf("opening ssh session on %s: %w", c.addr, err)
	}
	defer func() { _ = sess.Close() }()
	modes := ssh.TerminalModes{ssh.ECHO: 1, ssh.TTY_OP_ISPEED: 38400, ssh.TTY_OP_OSPEED: 38400}
	if err := sess.RequestPty(term.Term, term.Height, term.Width, modes); err != nil {
		return fmt.Errorf("opening a terminal on %s: %w", c.addr, err)
	}
	out := &guardWriter{w: stdout}
	defer out.close()
	sess.Stdout = out
	sess.Stderr = out
	// Stdin is copied here, as in Run, so that Wait does not block on a
	// reader (such as os.Stdin) that has nothing more to say.
	var stdinPipe io.WriteCloser
	if stdin != nil {
		if stdinPipe, err = sess.StdinPipe(); err != nil {
			return fmt.Errorf("opening stdin of %s on %s: %w", name, c.addr, err)
		}
	}
	if cmd == "" {
		err = sess.Shell()
	} else {
		err = sess.Start(cmd)
	}
	if err != nil {
		return fmt.Errorf("starting %s on %s: %w", name, c.addr, err)
	}
	if stdin != nil {
		go func() {
			if _, err := io.Copy(stdinPipe, stdin); err == nil {
				_ = stdinPipe.Close()
			}
		}()
	}
	done := make(chan struct{})
	defer close(done)
	if resize != nil {
		go func() {
			for {
				select {
				case t, ok := <-resize:
					if !ok {
						return
					}
					t = t.withDefaults()
					if t.Width > 0 && t.Height > 0 {
						_ = sess.WindowChange(t.Height, t.Width)
					}
				case <-done:
					return
				}
			}
		}()
	}

	waited := make(chan error, 1)
	go func() { waited <- sess.Wait() }()
	select {
	case err = <-waited:
	case <-ctx.Done():
		// Closing the channel makes sshd close the terminal, and the
		// kernel hangs up its session: unlike a signal sent through ssh,
		// that works for root logins too.
		_ = sess.Signal(ssh.SIGHUP)
		_ = sess.Close()
		return fmt.Errorf("running %s on %s: %w", name, c.addr, ctx.Err())
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("running %s on %s: %w", name, c.addr, ctxErr)
	}
	var exitErr *ssh.ExitError
	if errors.As(err, &exitErr) {
		return &ExitError{Command: name, Status: exitErr.ExitStatus(), Signal: exitErr.Signal()}
	}
	if err != nil {
		return fmt.Errorf("running %s on %s: %w", name, c.addr, err)
	}
	return nil
}
