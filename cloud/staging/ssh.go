package staging

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/internal/shell"
	"golang.org/x/crypto/ssh"
)

// connectTimeout bounds connecting and the ssh handshake when ctx has no
// earlier deadline, so a host that drops packets cannot hang a caller that
// forgot one.
const connectTimeout = 30 * time.Second

// stderrTail is how much of a failed command's stderr an ExitError keeps:
// enough for the reason, which comes last, without holding a noisy log.
const stderrTail = 4096

// Client is an ssh connection to one staging server as one user.
type Client struct {
	addr string
	conn *ssh.Client
}

// ExitError reports a remote command that ran and failed.
type ExitError struct {
	Command string
	Status  int    // the exit status; 128+n when killed by signal n
	Signal  string // the signal that killed it, without "SIG", if any
	Stderr  string // the last few KiB of its standard error
}

func (e *ExitError) Error() string {
	how := fmt.Sprintf("exited with status %d", e.Status)
	if e.Signal != "" {
		how = "was killed by signal " + e.Signal
	}
	msg := fmt.Sprintf("remote command %q %s", e.Command, how)
	if s := strings.TrimSpace(e.Stderr); s != "" {
		msg += ": " + s
	}
	return msg
}

// Dial connects to addr ("host:port") as user, authenticating with signer and
// accepting only a host key pinned in kh.
func Dial(ctx context.Context, addr, user string, signer ssh.Signer, kh *KnownHosts) (*Client, error) {
	return DialAlias(ctx, addr, "", user, signer, kh)
}

// DialAlias is Dial with the host key looked up under hostKeyAlias instead
// of addr, as OpenSSH's HostKeyAlias. Staging servers are pinned under their
// instance id: clouds reuse addresses, and an address that once belonged to
// another machine must not make a new one look like a changed key.
func DialAlias(ctx context.Context, addr, hostKeyAlias, user string, signer ssh.Signer, kh *KnownHosts) (*Client, error) {
	hostKeyCallback, err := kh.HostKeyCallback()
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", addr, err)
	}
	lookup := withPort(addr)
	if hostKeyAlias != "" {
		lookup = withPort(hostKeyAlias)
		byAddr := hostKeyCallback
		hostKeyCallback = func(_ string, _ net.Addr, key ssh.PublicKey) error {
			return byAddr(lookup, fakeAddr(lookup), key)
		}
	}
	pinned, err := kh.pinnedKeys(lookup)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", addr, err)
	}
	config := &ssh.ClientConfig{
		User:            user,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: hostKeyCallback,
		// Ask only for the kinds of key that are pinned: a server with
		// several host keys could otherwise show one we never pinned and
		// look like a changed key.
		HostKeyAlgorithms: hostKeyAlgorithms(pinned),
	}

	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", addr, err)
	}
	// The handshake knows nothing of ctx: a deadline bounds it, and closing
	// the connection ends it early on cancellation.
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	sshConn, chans, reqs, err := ssh.NewClientConn(conn, addr, config)
	if !stop() || err != nil {
		_ = conn.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("ssh handshake with %s as %s: %w", addr, user, err)
	}
	_ = conn.SetDeadline(time.Time{})
	return &Client{addr: addr, conn: ssh.NewClient(sshConn, chans, reqs)}, nil
}

// hostKeyAlgorithms lists the algorithms that can show one of keys.
func hostKeyAlgorithms(keys []ssh.PublicKey) []string {
	var algos []string
	for _, k := range keys {
		if k.Type() == ssh.KeyAlgoRSA {
			// The same RSA key signs with SHA-2 too, and OpenSSH prefers it.
			algos = append(algos, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256)
		}
		algos = append(algos, k.Type())
	}
	return algos
}

// pidPrefix makes the remote shell report its process id as the first line
// of stderr (which pidFilter removes) before it reads the command. sshd makes
// that shell the leader of a new session, so its process group holds the
// command and its children. It is a line of its own so that a syntax error
// in the command cannot stop it running.
const pidPrefix = "echo $$ >&2\n"

// killWait bounds each step of killing a cancelled command, so cancelling
// stays prompt when the server does not answer.
const killWait = 2 * time.Second

// inputFailedKillWait bounds each step of killing a command whose input
// could not be read. It is longer than killWait: nobody is waiting to stop,
// and if the kill does not land before the session closes, the command
// reads the close as the end of a complete input.
const inputFailedKillWait = 30 * time.Second

// killCommand kills the command of sess, whose shell's pid is reported to
// pid, waiting at most patience for each step. OpenSSH delivers the signal
// for ordinary users; for a root login it cannot (no privilege
// separation), and closing the session only closes the command's stdin and
// output. Killing the process group from a second session works for both.
func (c *Client) killCommand(sess *ssh.Session, pid *pidFilter, patience time.Duration) {
	_ = sess.Signal(ssh.SIGKILL)
	select {
	case <-pid.known:
	case <-time.After(patience):
	}
	if p := pid.get(); p > 1 {
		c.killGroup(p, patience)
	}
}

// killGroup kills process group pgid on the server from a new session,
// waiting at most patience for it.
func (c *Client) killGroup(pgid int, patience time.Duration) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		sess, err := c.conn.NewSession()
		if err != nil {
			return // the connection is gone, and the command's session with it
		}
		defer func() { _ = sess.Close() }()
		_ = sess.Run(fmt.Sprintf("kill -KILL -- -%d 2>/dev/null; kill -KILL %d 2>/dev/null; true", pgid, pgid))
	}()
	select {
	case <-done:
	case <-time.After(patience):
	}
}

// Alive reports whether the connection still answers (an OpenSSH
// keepalive request).
func (c *Client) Alive() bool {
	answer := make(chan error, 1)
	go func() {
		_, _, err := c.conn.SendRequest("keepalive@openssh.com", true, nil)
		answer <- err
	}()
	select {
	case err := <-answer:
		return err == nil
	case <-time.After(10 * time.Second):
		return false // a peer that does not answer is as good as gone
	}
}

// Close closes the connection and every session on it.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Run runs cmd through the remote user's shell, streaming stdin to it and
// its output to stdout and stderr (nil discards). A command that exits
// non-zero gives an *ExitError. Cancelling ctx kills the command (its whole
// process group) and closes the session. The remote login shell must be a
// POSIX-style shell (sh, bash, dash), as on every staging image.
func (c *Client) Run(ctx context.Context, cmd string, stdin io.Reader, stdout, stderr io.Writer) error {
	sess, err := c.conn.NewSession()
	if err != nil {
		return fmt.Errorf("opening ssh session on %s: %w", c.addr, err)
	}
	defer func() { _ = sess.Close() }()
	// The caller's writers are guarded so that nothing reaches them after
	// Run returns, even from a command still running after cancellation.
	tail := &tailBuffer{max: stderrTail}
	out, errOut := &guardWriter{w: stdout}, &guardWriter{w: io.MultiWriter(tail, orDiscard(stderr))}
	defer out.close()
	defer errOut.close()
	pid := newPIDFilter(errOut)
	sess.Stdout = out
	sess.Stderr = pid

	var killed sync.Once
	kill := func(patience time.Duration) {
		killed.Do(func() {
			c.killCommand(sess, pid, patience)
			_ = sess.Close()
		})
	}

	// Stdin is copied here rather than by the ssh package, whose Wait would
	// block on a reader that never returns even after the command ended.
	var stdinPipe io.WriteCloser
	if stdin != nil {
		if stdinPipe, err = sess.StdinPipe(); err != nil {
			return fmt.Errorf("opening stdin of %q on %s: %w", cmd, c.addr, err)
		}
	}
	if err := sess.Start(pidPrefix + cmd); err != nil {
		return fmt.Errorf("starting %q on %s: %w", cmd, c.addr, err)
	}
	// readFailed is closed, after readErr is set, before the command is
	// killed, so it is seen closed once Wait returns for that reason.
	var readErr error
	readFailed := make(chan struct{})
	if stdin != nil {
		go func() {
			_, err := io.Copy(stdinPipe, readerFunc(func(p []byte) (int, error) {
				n, err := stdin.Read(p)
				if err != nil && err != io.EOF {
					readErr = err
				}
				return n, err
			}))
			if readErr != nil {
				// Sending EOF would tell the command its input was
				// complete; kill it instead. (Upload also checks the
				// size it received, in case the kill fails.)
				close(readFailed)
				kill(inputFailedKillWait)
				return
			}
			if err == nil {
				_ = stdinPipe.Close()
			}
		}()
	}

	waited := make(chan error, 1)
	go func() { waited <- sess.Wait() }()
	select {
	case err = <-waited:
	case <-ctx.Done():
		// Do not wait for a command that ignored the kill: the caller
		// asked to stop now. Wait's goroutine ends with the command or
		// the connection.
		kill(killWait)
		return fmt.Errorf("running %q on %s: %w", cmd, c.addr, ctx.Err())
	}
	pid.flush()
	select {
	case <-readFailed:
		return fmt.Errorf("reading input for %q on %s: %w", cmd, c.addr, readErr)
	default:
		// A command may end without reading all of stdin; that is its
		// business, and its exit status says whether it minded.
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("running %q on %s: %w", cmd, c.addr, ctxErr)
	}
	var exitErr *ssh.ExitError
	if errors.As(err, &exitErr) {
		return &ExitError{Command: cmd, Status: exitErr.ExitStatus(), Signal: exitErr.Signal(), Stderr: tail.String()}
	}
	if err != nil {
		return fmt.Errorf("running %q on %s: %w", cmd, c.addr, err)
	}
	return nil
}

// Output runs cmd and returns its standard output.
func (c *Client) Output(ctx context.Context, cmd string) ([]byte, error) {
	var out bytes.Buffer
	err := c.Run(ctx, cmd, nil, &out, nil)
	return out.Bytes(), err
}

// Upload copies the local file to remotePath with the given mode. It writes
// a temporary file beside remotePath and renames it, so a failed upload
// never leaves a truncated file under the real name.
func (c *Client) Upload(ctx context.Context, localPath, remotePath string, mode os.FileMode) error {
	f, err := os.Open(localPath)
	if err != nil {
		return fmt.Errorf("uploading %s: %w", localPath, err)
	}
	defer func() { _ = f.Close() }() // read only: closing cannot lose data
	info, err := f.Stat()
	if err != nil {
		return fmt.Errorf("uploading %s: %w", localPath, err)
	}
	if !info.Mode().IsRegular() {
		return fmt.Errorf("uploading %s: not a regular file", localPath)
	}
	// The remote side checks the size it received because a command that
	// cannot be killed sees a failed local read as the end of its input.
	tmp := shell.Quote(remotePath + ".hangar-upload")
	cmd := fmt.Sprintf("umask 077 && cat > %[1]s && n=$(wc -c < %[1]s) && "+
		"if [ $n -ne %[2]d ]; then echo \"received $n of %[2]d bytes\" >&2; false; fi && "+
		"chmod %04[3]o %[1]s && mv -f %[1]s %[4]s || { s=$?; rm -f %[1]s; exit $s; }",
		tmp, info.Size(), mode.Perm(), shell.Quote(remotePath))
	if err := c.Run(ctx, cmd, f, nil, nil); err != nil {
		return fmt.Errorf("uploading %s to %s:%s: %w", localPath, c.addr, remotePath, err)
	}
	return nil
}

// Download copies remotePath to the local file, replacing it only once the
// whole file has arrived.
func (c *Client) Download(ctx context.Context, remotePath, localPath string) error {
	f, err := os.CreateTemp(filepath.Dir(localPath), "."+filepath.Base(localPath)+".hangar-download-*")
	if err != nil {
		return fmt.Errorf("downloading %s:%s: %w", c.addr, remotePath, err)
	}
	defer func() { _ = os.Remove(f.Name()) }()
	err = c.Run(ctx, "cat "+shell.Quote(remotePath), nil, f, nil)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// CreateTemp makes 0600; a downloaded file is ordinary data.
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), localPath)
	}
	if err != nil {
		return fmt.Errorf("downloading %s:%s to %s: %w", c.addr, remotePath, localPath, err)
	}
	return nil
}

// guardWriter passes writes on until closed and drops them after.
type guardWriter struct {
	mu     sync.Mutex
	w      io.Writer
	closed bool
}

func (g *guardWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed || g.w == nil {
		return len(p), nil
	}
	return g.w.Write(p)
}

func (g *guardWriter) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// pidFilter takes the process id that pidPrefix prints off the front of
// stderr and passes the rest on.
type pidFilter struct {
	mu    sync.Mutex
	w     io.Writer
	line  []byte
	done  bool
	pid   int
	known chan struct{} // closed once the first line is in
}

func newPIDFilter(w io.Writer) *pidFilter {
	return &pidFilter{w: w, known: make(chan struct{})}
}

func (f *pidFilter) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		return f.w.Write(p)
	}
	i := bytes.IndexByte(p, '\n')
	if i < 0 {
		f.line = append(f.line, p...)
		if len(f.line) > 32 { // longer than any process id
			f.finish(false)
		}
		return len(p), nil
	}
	f.line = append(f.line, p[:i+1]...)
	f.finish(true)
	if _, err := f.w.Write(p[i+1:]); err != nil {
		return 0, err
	}
	return len(p), nil
}

// finish ends the first line; whatever is not a process id is passed on.
func (f *pidFilter) finish(complete bool) {
	f.done = true
	defer close(f.known)
	if complete {
		pid, err := strconv.Atoi(string(bytes.TrimSuffix(f.line, []byte("\n"))))
		if err == nil && pid > 0 {
			f.pid = pid
			return
		}
	}
	_, _ = f.w.Write(f.line)
}

// flush passes on a first line that never ended.
func (f *pidFilter) flush() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.done {
		f.finish(false)
	}
}

func (f *pidFilter) get() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pid
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// tailBuffer keeps the last max bytes written to it. The ssh package writes
// stderr from its own goroutine, hence the lock.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}
