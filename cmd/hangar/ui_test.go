package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"image/png"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// The status page in a real browser, against a real server: it shows the
// pool, the leased instance, its lease and its events, and a lease made
// while it is open appears without a reload.
func TestStatusPage(t *testing.T) {
	needChromium(t)
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	checkUIServed(t, ts.url)
	first := ts.lease(t, api.LeaseRequest{Pool: "demo"})

	b := startChromium(t)
	b.navigate(ts.url + "/ui") // redirected to /ui/
	b.waitText("#pools", "demo")
	b.waitText("#instances", first.Instance.ID)
	b.waitText("#instances", "leased")
	b.waitText("#leases", first.ID)
	b.waitText("#events", first.Instance.ID)
	b.waitText("#events", "idle → leased")
	if n := b.evalString(`String(document.querySelectorAll("script:not([src])").length)`); n != "0" {
		t.Errorf("the page has %s inline scripts; the CSP allows none", n)
	}
	b.screenshot("status-page.png")

	// A mark a reload would wipe.
	b.evalString(`window.hangarTestMark = "still here"`)
	second := ts.lease(t, api.LeaseRequest{Pool: "demo"})
	b.waitText("#leases", second.ID)
	b.waitText("#instances", second.Instance.ID)
	if mark := b.evalString(`String(window.hangarTestMark)`); mark != "still here" {
		t.Errorf("the page was reloaded to show the new lease (mark %q)", mark)
	}
	if n := b.evalString(`String(performance.getEntriesByType("navigation").length)`); n != "1" {
		t.Errorf("%s navigations, want the first one only", n)
	}
}

// With tokens configured the page asks for one; a wrong one is refused; a
// lease token sees its own leases only and is told the admin-only parts
// need an admin token; after "forget token" an admin token sees all. No
// token is ever in a URL.
func TestStatusPageWithTokens(t *testing.T) {
	needChromium(t)
	const aliceTok, adminTok = "alice-secret-0123456789", "admin-secret-0123456789"
	ts := startTest(t, testTOML(t.TempDir(), "demo", "")+`
[[server.tokens]]
name = "alice"
role = "lease"
token = "`+aliceTok+`"
[[server.tokens]]
name = "ops"
role = "admin"
token = "`+adminTok+`"
`, nil)
	ts.client.Token = adminTok
	checkUIServed(t, ts.url)
	alice := &api.Client{BaseURL: ts.url, Token: aliceTok}
	mine, err := alice.Lease(context.Background(), api.LeaseRequest{Pool: "demo", Wait: "60s"})
	if err != nil || mine.State != pool.LeaseActive {
		t.Fatalf("alice's lease: %+v, %v", mine, err)
	}
	theirs := ts.lease(t, api.LeaseRequest{Pool: "demo"})

	// GET /v1/events: a lease token sees the pool's events, as it sees
	// its instances; an unknown pool is 404.
	for _, c := range []struct {
		path, token string
		status      int
	}{
		{"/v1/events", "", http.StatusUnauthorized},
		{"/v1/events", aliceTok, http.StatusOK},
		{"/v1/events?pool=demo", aliceTok, http.StatusOK},
		{"/v1/events?pool=nope", aliceTok, http.StatusNotFound},
	} {
		if status, e := call(t, ts.url, "GET", c.path, "", c.token); status != c.status {
			t.Errorf("GET %s: %d %+v, want %d", c.path, status, e, c.status)
		}
	}

	b := startChromium(t)
	b.navigate(ts.url + "/ui/")
	b.waitVisible("#login")
	b.waitText("#login", "needs an API token")
	if b.visible("#data") {
		t.Error("the data sections show before a token is given")
	}

	b.login("not-a-token-of-this-server")
	b.waitText("#login-message", "refused")
	if got := b.evalString(`String(sessionStorage.getItem("hangar-token"))`); got != "null" {
		t.Errorf("a refused token is kept in sessionStorage (%q)", got)
	}

	b.login(aliceTok)
	b.waitVisible("#data")
	b.waitText("#pools", "demo")
	b.waitText("#leases", mine.ID)
	b.waitText("#leases-note", "Only this token's leases")
	b.waitText("#cache", "Needs an admin token")
	b.waitText("#instances", theirs.Instance.ID)
	b.waitText("#instances", "another token's")
	b.waitText("#events", mine.Instance.ID)
	if text := b.text("#data"); strings.Contains(text, theirs.ID) {
		t.Errorf("alice's page shows the admin's lease %s:\n%s", theirs.ID, text)
	}
	if got := b.evalString(`String(sessionStorage.getItem("hangar-token"))`); got != aliceTok {
		t.Errorf("sessionStorage has %q, want alice's token", got)
	}
	b.screenshot("status-page-lease-token.png")

	b.click("#forget")
	b.waitVisible("#login")
	b.login(adminTok)
	b.waitText("#leases", theirs.ID)
	b.waitText("#leases", mine.ID)
	b.waitText("#cache", "no cache")
	if note := b.text("#leases-note"); strings.Contains(note, "Only") {
		t.Errorf("an admin is told %q", note)
	}

	urls := b.evalString(`[location.href].concat(performance.getEntriesByType("resource").map(e => e.name)).join("\n")`)
	for _, tok := range []string{aliceTok, adminTok} {
		if strings.Contains(urls, tok) {
			t.Errorf("a token is in a URL the page loaded:\n%s", urls)
		}
		if strings.Contains(ts.logs.String(), tok) {
			t.Error("a token reached the server log")
		}
	}
}

// checkUIServed: the page is served without a token, with its security
// headers, and /ui redirects to it.
func checkUIServed(t *testing.T, base string) {
	t.Helper()
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(base + "/ui")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "/ui/" {
		t.Errorf("GET /ui: %d to %q, want a redirect to /ui/", resp.StatusCode, resp.Header.Get("Location"))
	}
	for _, path := range []string{"/ui/", "/ui/app.js", "/ui/style.css"} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		csp := resp.Header.Get("Content-Security-Policy")
		if resp.StatusCode != http.StatusOK || len(body) == 0 {
			t.Errorf("GET %s without a token: %d, %d bytes; want the file", path, resp.StatusCode, len(body))
		}
		if !strings.Contains(csp, "default-src 'self'") || strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "unsafe-eval") {
			t.Errorf("GET %s: Content-Security-Policy %q, want default-src 'self' and nothing unsafe", path, csp)
		}
		if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
			t.Errorf("GET %s: X-Content-Type-Options %q, want nosniff", path, got)
		}
	}
}

// ---- driving Chromium over the DevTools protocol ----

func needChromium(t *testing.T) string {
	t.Helper()
	return testutil.NeedTool(t, "chromium", "drives the status page in a real browser; apt-get install --no-install-recommends chromium")
}

// browser is one headless Chromium with one page, driven over the Chrome
// DevTools Protocol on a websocket of its own (see wsConn).
type browser struct {
	t       *testing.T
	cdp     *cdpConn
	session string // the page's, for flat-mode commands
}

// startChromium starts a headless Chromium whose every file is under
// t.TempDir(), and opens a blank page in it. It is killed, with all its
// processes, when the test ends.
func startChromium(t *testing.T) *browser {
	t.Helper()
	bin := needChromium(t)
	dir := t.TempDir()
	args := []string{
		"--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
		"--user-data-dir=" + filepath.Join(dir, "profile"),
		"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
		"--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-default-apps",
		// Nothing but the test's server: no update checks, sync or
		// discovery, which would reach for the network.
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-features=MediaRouter,Translate,OptimizationHints",
		"--password-store=basic", "--use-mock-keychain",
		"--window-size=1400,1000",
		"about:blank",
	}
	if os.Geteuid() == 0 {
		// Chromium refuses to start its sandbox as root, and CI runs the
		// tests as root in a container. The page it loads is our own.
		args = append(args, "--no-sandbox")
	}
	cmd := exec.Command(bin, args...)
	// Its caches, crash reports and shared-memory files (TMPDIR, with
	// --disable-dev-shm-usage) land under the test's directory too.
	cmd.Env = append(os.Environ(), "HOME="+dir, "TMPDIR="+dir, "XDG_CONFIG_HOME="+dir, "XDG_CACHE_HOME="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		// Its renderers and zygotes are in its process group.
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-exited
		waitGroupGone(t, pgid)
		if t.Failed() {
			t.Logf("chromium output:\n%s", out.String())
		}
	})

	// Chromium writes the port it chose, and its browser target's path,
	// to DevToolsActivePort once it listens.
	var port, path string
	deadline := time.Now().Add(time.Minute)
	for port == "" {
		select {
		case <-exited:
			t.Fatalf("chromium exited before listening:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromium wrote no DevToolsActivePort within a minute:\n%s", out.String())
		}
		if b, err := os.ReadFile(filepath.Join(dir, "profile", "DevToolsActivePort")); err == nil {
			if lines := strings.Split(strings.TrimSpace(string(b)), "\n"); len(lines) == 2 {
				port, path = lines[0], lines[1]
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	ws, err := dialWebsocket("ws://127.0.0.1:" + port + path)
	if err != nil {
		t.Fatalf("connecting to chromium's DevTools: %v", err)
	}
	t.Cleanup(func() { _ = ws.conn.Close() })
	b := &browser{t: t, cdp: &cdpConn{ws: ws}}
	var target struct {
		TargetID string `json:"targetId"`
	}
	b.must("", "Target.createTarget", map[string]any{"url": "about:blank"}, &target)
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	b.must("", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached)
	b.session = attached.SessionID
	return b
}

// waitGroupGone waits a while for every process of group pgid to have
// died, so that none writes to the test's directory as it is removed.
// Zombies count as gone: whoever reaps them (init) is not ours to wait for.
func waitGroupGone(t *testing.T, pgid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		alive := groupMembers(pgid)
		if len(alive) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("chromium processes %v outlived a SIGKILL of their group", alive)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// groupMembers lists the live, non-zombie processes of group pgid.
func groupMembers(pgid int) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) >= 3 && f[2] == strconv.Itoa(pgid) && f[0] != "Z" && f[0] != "X" {
			out = append(out, e.Name())
		}
	}
	return out
}

func (b *browser) must(session, method string, params, result any) {
	b.t.Helper()
	if err := b.cdp.call(session, method, params, result); err != nil {
		b.t.Fatal(err)
	}
}

func (b *browser) navigate(u string) {
	b.t.Helper()
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	b.must(b.session, "Page.navigate", map[string]any{"url": u}, &nav)
	if nav.ErrorText != "" {
		b.t.Fatalf("navigating to %s: %s", u, nav.ErrorText)
	}
}

// eval runs a JavaScript expression in the page and returns its value.
func (b *browser) eval(expr string) (any, error) {
	var res struct {
		Result struct {
			Value any `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception *struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	err := b.cdp.call(b.session, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true}, &res)
	if err != nil {
		return nil, err
	}
	if e := res.ExceptionDetails; e != nil {
		msg := e.Text
		if e.Exception != nil {
			msg = e.Exception.Description
		}
		return nil, fmt.Errorf("evaluating %s: %s", expr, msg)
	}
	return res.Result.Value, nil
}

func (b *browser) evalString(expr string) string {
	b.t.Helper()
	v, err := b.eval(expr)
	if err != nil {
		b.t.Fatal(err)
	}
	s, _ := v.(string)
	return s
}

func jsString(s string) string {
	q, _ := json.Marshal(s)
	return string(q)
}

// text is what the page shows of the element sel ("" when there is none).
func (b *browser) text(sel string) string {
	b.t.Helper()
	return b.evalString(`(e => e ? e.innerText : "")(document.querySelector(` + jsString(sel) + `))`)
}

func (b *browser) visible(sel string) bool {
	b.t.Helper()
	return b.evalString(`(e => String(!!e && e.checkVisibility()))(document.querySelector(`+jsString(sel)+`))`) == "true"
}

// waitUntil polls the page until cond holds, for a minute at most (the
// page refreshes itself every 2 s; a slow machine is given plenty).
func (b *browser) waitUntil(what string, cond func() bool) {
	b.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			b.t.Fatalf("timed out waiting for %s; the page shows:\n%s", what, b.text("body"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (b *browser) waitText(sel, want string) {
	b.t.Helper()
	b.waitUntil(fmt.Sprintf("%s to show %q", sel, want), func() bool {
		return b.visible(sel) && strings.Contains(b.text(sel), want)
	})
}

func (b *browser) waitVisible(sel string) {
	b.t.Helper()
	b.waitUntil(sel+" to show", func() bool { return b.visible(sel) })
}

func (b *browser) click(sel string) {
	b.t.Helper()
	b.evalString(`document.querySelector(` + jsString(sel) + `).click()`)
}

// login types token into the page's token form and submits it.
func (b *browser) login(token string) {
	b.t.Helper()
	b.evalString(`document.querySelector("#token").value = ` + jsString(token) + `; document.querySelector("#login-form").requestSubmit()`)
}

// screenshot saves the page as a PNG under t.TempDir() and, when
// HANGAR_ARTIFACTS names a directory, there too, and checks it is a
// picture of something.
func (b *browser) screenshot(name string) {
	b.t.Helper()
	var shot struct {
		Data string `json:"data"`
	}
	b.must(b.session, "Page.captureScreenshot", map[string]any{"format": "png"}, &shot)
	data, err := base64.StdEncoding.DecodeString(shot.Data)
	if err != nil {
		b.t.Fatalf("screenshot: %v", err)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		b.t.Fatalf("screenshot is no PNG: %v", err)
	}
	colours := map[[4]uint32]bool{}
	r := img.Bounds()
	for y := r.Min.Y; y < r.Max.Y; y += 7 {
		for x := r.Min.X; x < r.Max.X; x += 7 {
			cr, cg, cb, ca := img.At(x, y).RGBA()
			colours[[4]uint32{cr, cg, cb, ca}] = true
		}
	}
	if r.Dx() < 800 || len(colours) < 3 {
		b.t.Errorf("screenshot %dx%d with %d colours: blank?", r.Dx(), r.Dy(), len(colours))
	}
	path := filepath.Join(b.t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot: %s", path)
	if dir := os.Getenv("HANGAR_ARTIFACTS"); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			b.t.Fatalf("HANGAR_ARTIFACTS: %v", err)
		}
		path = filepath.Join(dir, b.t.Name()+"-"+name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			b.t.Fatalf("HANGAR_ARTIFACTS: %v", err)
		}
		b.t.Logf("screenshot artifact: %s", path)
	}
}

// cdpConn sends DevTools commands one at a time and waits for each answer,
// passing over the events that arrive meanwhile: the tests poll the page
// rather than follow its events.
type cdpConn struct {
	ws     *wsConn
	lastID int
}

func (c *cdpConn) call(session, method string, params, result any) error {
	c.lastID++
	id := c.lastID
	msg := map[string]any{"id": id, "method": method}
	if params != nil {
		msg["params"] = params
	}
	if session != "" {
		msg["sessionId"] = session
	}
	req, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	// Bounds a browser that stopped answering; no assertion on speed.
	if err := c.ws.conn.SetDeadline(time.Now().Add(time.Minute)); err != nil {
		return err
	}
	if err := c.ws.writeFrame(wsText, req); err != nil {
		return fmt.Errorf("sending %s: %w", method, err)
	}
	for {
		raw, err := c.ws.readMessage()
		if err != nil {
			return fmt.Errorf("reading the answer to %s: %w", method, err)
		}
		var answer struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Message string `json:"message"`
				Data    string `json:"data"`
			} `json:"error"`
		}
		if err := json.Unmarshal(raw, &answer); err != nil {
			return fmt.Errorf("decoding a DevTools message: %w", err)
		}
		if answer.ID != id {
			continue // an event
		}
		if answer.Error != nil {
			return fmt.Errorf("%s: %s %s", method, answer.Error.Message, answer.Error.Data)
		}
		if result == nil {
			return nil
		}
		return json.Unmarshal(answer.Result, result)
	}
}

// wsConn is the client end of a websocket (RFC 6455), as much of it as
// the DevTools protocol needs: text messages, fragmented or not, and pings.
// Hand-written to keep a test-only websocket library out of go.mod.
type wsConn struct {
	conn net.Conn
	r    *bufio.Reader
}

const (
	wsContinuation = 0x0
	wsText         = 0x1
	wsClose        = 0x8
	wsPing         = 0x9
	wsPong         = 0xA
)

func dialWebsocket(rawURL string) (*wsConn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, 16)
	_, _ = rand.Read(nonce)
	key := base64.StdEncoding.EncodeToString(nonce)
	// No Origin header: Chromium accepts DevTools clients that send none.
	req := "GET " + u.RequestURI() + " HTTP/1.1\r\nHost: " + u.Host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.WriteString(conn, req); err != nil {
		_ = conn.Close()
		return nil, err
	}
	r := bufio.NewReader(conn)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("websocket handshake: %w", err)
	}
	_ = resp.Body.Close()
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		_ = conn.Close()
		return nil, fmt.Errorf("websocket handshake: %s", resp.Status)
	}
	return &wsConn{conn: conn, r: r}, nil
}

// writeFrame sends one whole message; a client masks every frame.
func (w *wsConn) writeFrame(opcode byte, payload []byte) error {
	hdr := []byte{0x80 | opcode}
	switch n := len(payload); {
	case n < 126:
		hdr = append(hdr, 0x80|byte(n))
	case n <= 0xffff:
		hdr = append(hdr, 0x80|126, byte(n>>8), byte(n))
	default:
		hdr = append(hdr, 0x80|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(n))
	}
	var mask [4]byte
	_, _ = rand.Read(mask[:])
	frame := append(hdr, mask[:]...)
	for i, c := range payload {
		frame = append(frame, c^mask[i%4])
	}
	_, err := w.conn.Write(frame)
	return err
}

// readMessage returns the next text or binary message, answering pings.
func (w *wsConn) readMessage() ([]byte, error) {
	var msg []byte
	for {
		var h [2]byte
		if _, err := io.ReadFull(w.r, h[:]); err != nil {
			return nil, err
		}
		fin, opcode := h[0]&0x80 != 0, h[0]&0x0f
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var ext [2]byte
			if _, err := io.ReadFull(w.r, ext[:]); err != nil {
				return nil, err
			}
			n = uint64(binary.BigEndian.Uint16(ext[:]))
		case 127:
			var ext [8]byte
			if _, err := io.ReadFull(w.r, ext[:]); err != nil {
				return nil, err
			}
			n = binary.BigEndian.Uint64(ext[:])
		}
		var mask []byte
		if h[1]&0x80 != 0 {
			mask = make([]byte, 4)
			if _, err := io.ReadFull(w.r, mask); err != nil {
				return nil, err
			}
		}
		if n > 256<<20 {
			return nil, fmt.Errorf("websocket frame of %d bytes", n)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(w.r, payload); err != nil {
			return nil, err
		}
		if mask != nil {
			for i := range payload {
				payload[i] ^= mask[i%4]
			}
		}
		switch opcode {
		case wsClose:
			return nil, errors.New("the browser closed the websocket")
		case wsPing:
			if err := w.writeFrame(wsPong, payload); err != nil {
				return nil, err
			}
			continue
		case wsPong:
			continue
		case wsContinuation:
		default:
			msg = msg[:0]
		}
		msg = append(msg, payload...)
		if fin {
			return msg, nil
		}
	}
}
