package jenkins

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode"
)

// Errors that HTTPError wraps, so that callers can tell them apart.
var (
	// ErrAuth: the controller refused the user or its API token (401), or
	// the user lacks a permission (403).
	ErrAuth = errors.New("refused by jenkins")
	// ErrNotFound: no such node (404).
	ErrNotFound = errors.New("not found")
)

// HTTPError is an error answer of the controller.
type HTTPError struct {
	Status int
	User   string
	// Detail is the controller's own reason (the title of its error page,
	// or the first line of a plain answer); never anything that was sent.
	Detail string
}

func (e *HTTPError) Error() string {
	var why string
	switch e.Status {
	case http.StatusUnauthorized:
		why = fmt.Sprintf("user %q or its API token was refused", e.User)
	case http.StatusForbidden:
		why = fmt.Sprintf("user %q lacks a permission this needs (Overall/Read, Agent/Create, Agent/Configure, Agent/Connect, Agent/Disconnect, Agent/Delete)", e.User)
	case http.StatusNotFound:
		why = "not found"
	default:
		why = http.StatusText(e.Status)
	}
	msg := fmt.Sprintf("HTTP %d: %s", e.Status, why)
	if e.Detail != "" {
		msg += " (" + e.Detail + ")"
	}
	return msg
}

func (e *HTTPError) Unwrap() error {
	switch e.Status {
	case http.StatusUnauthorized, http.StatusForbidden:
		return ErrAuth
	case http.StatusNotFound:
		return ErrNotFound
	}
	return nil
}

// Client calls the REST API of one Jenkins controller as one user with an
// API token (HTTP basic auth), with a CSRF crumb on every POST when the
// controller issues them.
type Client struct {
	URL   string // the controller's root URL, ending in "/"
	User  string
	Token string
	// HTTP is the client to use; nil gets one with a 30s timeout. Either
	// way redirects after a POST are not followed: Jenkins answers a done
	// action with a redirect to an HTML page.
	HTTP *http.Client

	once  sync.Once
	http  *http.Client
	mu    sync.Mutex
	crumb *crumb // nil until asked for
}

type crumb struct{ field, value string } // field "" when the controller has CSRF protection off

func (c *Client) client() *http.Client {
	c.once.Do(func() {
		hc := http.Client{Timeout: 30 * time.Second}
		if c.HTTP != nil {
			hc = *c.HTTP
		}
		if hc.Jar == nil {
			// Crumbs are bound to the web session on Jenkins 2.176.2 and
			// later; the session is a cookie.
			hc.Jar, _ = cookiejar.New(nil)
		}
		hc.CheckRedirect = func(req *http.Request, via []*http.Request) error {
			if via[0].Method != http.MethodGet {
				return http.ErrUseLastResponse
			}
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			return nil
		}
		c.http = &hc
	})
	return c.http
}

// maxAnswer bounds what is read of an answer; a queue of thousands of items
// is a few megabytes.
const maxAnswer = 32 << 20

// request sends one request and returns the body of a successful answer.
func (c *Client) request(ctx context.Context, method, path string, query, form url.Values) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		body, status, err := c.send(ctx, method, path, query, form)
		if err != nil {
			return nil, err
		}
		if status < 400 {
			return body, nil
		}
		// A crumb can expire with its session: ask for a new one, once.
		if status == http.StatusForbidden && method == http.MethodPost && attempt == 0 && bytes.Contains(body, []byte("No valid crumb")) {
			c.mu.Lock()
			c.crumb = nil
			c.mu.Unlock()
			continue
		}
		return nil, &HTTPError{Status: status, User: c.User, Detail: detail(body)}
	}
}

func (c *Client) send(ctx context.Context, method, path string, query, form url.Values) ([]byte, int, error) {
	u := c.URL + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var rd io.Reader
	if form != nil {
		rd = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, 0, err
	}
	req.SetBasicAuth(c.User, c.Token)
	// The queue's "why" is localized; the label is read from the English.
	req.Header.Set("Accept-Language", "en")
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		cr, err := c.getCrumb(ctx)
		if err != nil {
			return nil, 0, err
		}
		if cr.field != "" {
			req.Header.Set(cr.field, cr.value)
		}
	}
	resp, err := c.client().Do(req)
	if err != nil {
		return nil, 0, err // names the URL, which holds no secret
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return nil, 0, fmt.Errorf("reading the answer to %s %s: %w", method, u, err)
	}
	return body, resp.StatusCode, nil
}

func (c *Client) getCrumb(ctx context.Context) (crumb, error) {
	c.mu.Lock()
	cr := c.crumb
	c.mu.Unlock()
	if cr != nil {
		return *cr, nil
	}
	var v struct {
		Crumb             string `json:"crumb"`
		CrumbRequestField string `json:"crumbRequestField"`
	}
	body, status, err := c.send(ctx, http.MethodGet, "crumbIssuer/api/json", nil, nil)
	switch {
	case err != nil:
		return crumb{}, fmt.Errorf("getting a CSRF crumb: %w", err)
	case status == http.StatusNotFound:
		// No crumb issuer: CSRF protection is off.
		cr = &crumb{}
	case status >= 400:
		return crumb{}, fmt.Errorf("getting a CSRF crumb: %w", &HTTPError{Status: status, User: c.User, Detail: detail(body)})
	default:
		if err := json.Unmarshal(body, &v); err != nil || v.Crumb == "" || v.CrumbRequestField == "" {
			return crumb{}, errors.New("getting a CSRF crumb: the crumb issuer's answer has no crumb")
		}
		cr = &crumb{field: v.CrumbRequestField, value: v.Crumb}
	}
	c.mu.Lock()
	c.crumb = cr
	c.mu.Unlock()
	return *cr, nil
}

var titleRe = regexp.MustCompile(`(?is)<title>(.*?)</title>`)

// detail extracts the controller's reason from an error answer: the title
// of an HTML error page, or the first line of anything else.
func detail(body []byte) string {
	s := string(body)
	if m := titleRe.FindStringSubmatch(s); m != nil {
		s = m[1]
	} else if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	s = strings.Join(strings.FieldsFunc(s, unicode.IsSpace), " ")
	if strings.HasPrefix(s, "<") {
		return "" // markup without a title says nothing
	}
	if r := []rune(s); len(r) > 200 {
		s = string(r[:200]) + "…"
	}
	return s
}

func (c *Client) getJSON(ctx context.Context, path string, query url.Values, out any) error {
	body, err := c.request(ctx, http.MethodGet, path, query, nil)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("decoding %s: %w", path, err)
	}
	return nil
}

// Whoami returns the id of the user the credentials authenticate.
func (c *Client) Whoami(ctx context.Context) (string, error) {
	var v struct {
		ID string `json:"id"`
	}
	if err := c.getJSON(ctx, "me/api/json", url.Values{"tree": {"id"}}, &v); err != nil {
		return "", fmt.Errorf("checking the credentials: %w", err)
	}
	return v.ID, nil
}

// QueueItem is one item of the build queue, as far as a watcher needs it.
type QueueItem struct {
	ID        int64  `json:"id"`
	Why       string `json:"why"`
	Buildable bool   `json:"buildable"`
	Blocked   bool   `json:"blocked"`
	// Pending: an executor has taken it and it is about to leave the queue.
	Pending bool `json:"pending"`
	Task    Task `json:"task"`
}

// Task is what a queue item would run.
type Task struct {
	Class string `json:"_class"`
	Name  string `json:"name"`
	URL   string `json:"url"`
	// LabelExpression is the job's "Restrict where this project can be
	// run" expression: exported by freestyle and other AbstractProject
	// jobs, empty for Pipeline steps, whose label only the why tells.
	LabelExpression string `json:"labelExpression"`
}

// whyLabel matches the reasons a buildable item waits for a label: Jenkins's
// Queue.LabelHasNoNodes, Queue.AllNodesOffline and
// Queue.WaitingForNextAvailableExecutorOn (core's Messages.properties), with
// typographic quotes since 2.x and plain ones before.
var whyLabel = regexp.MustCompile(`^(?:There are no nodes with the label [‘'](.+)[’']|All nodes of label [‘'](.+)[’'] are offline|Waiting for next available executor on [‘'](.+)[’'])$`)

// Label returns the label the item waits for, "" when it does not say.
// The why comes first: it names the label the queue really assigned, which
// an action (a label parameter, say) may have changed from the job's own;
// the task's labelExpression is the fallback for a why in another language
// or not written yet.
func (it QueueItem) Label() string {
	if m := whyLabel.FindStringSubmatch(strings.TrimSpace(it.Why)); m != nil {
		return m[1] + m[2] + m[3]
	}
	return it.Task.LabelExpression
}

// Queue lists the build queue.
func (c *Client) Queue(ctx context.Context) ([]QueueItem, error) {
	// labelExpression has visibility 1: the default depth 0 would leave it
	// out of the nested task, so the tree asks for it by name.
	q := url.Values{"tree": {"items[id,why,buildable,blocked,pending,task[name,url,labelExpression]]"}}
	var v struct {
		Items []QueueItem `json:"items"`
	}
	if err := c.getJSON(ctx, "queue/api/json", q, &v); err != nil {
		return nil, fmt.Errorf("reading the build queue: %w", err)
	}
	return v.Items, nil
}

// Computer is a node's live state.
type Computer struct {
	Class       string `json:"_class"`
	DisplayName string `json:"displayName"` // the node's name, for agents
	Description string `json:"description"`
	// Offline: disconnected or temporarily offline.
	Offline            bool `json:"offline"`
	TemporarilyOffline bool `json:"temporarilyOffline"`
	// Idle: no executor runs anything (no build, no flyweight task).
	Idle         bool   `json:"idle"`
	NumExecutors int    `json:"numExecutors"`
	OfflineCause string `json:"offlineCauseReason"`
}

const computerTree = "displayName,description,offline,temporarilyOffline,idle,numExecutors,offlineCauseReason"

// Computers lists every node.
func (c *Client) Computers(ctx context.Context) ([]Computer, error) {
	var v struct {
		Computer []Computer `json:"computer"`
	}
	if err := c.getJSON(ctx, "computer/api/json", url.Values{"tree": {"computer[" + computerTree + "]"}}, &v); err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	return v.Computer, nil
}

func nodePath(name string) string { return "computer/" + url.PathEscape(name) + "/" }

// Computer reads one node; the error wraps ErrNotFound when there is none.
func (c *Client) Computer(ctx context.Context, name string) (Computer, error) {
	var v Computer
	if err := c.getJSON(ctx, nodePath(name)+"api/json", url.Values{"tree": {computerTree}}, &v); err != nil {
		return Computer{}, fmt.Errorf("reading node %s: %w", name, err)
	}
	return v, nil
}

// NodeSpec is an inbound (JNLP/WebSocket) agent node to create.
type NodeSpec struct {
	Name        string
	Description string
	Label       string
	RemoteFS    string
	Executors   int
	// Exclusive: only builds whose label expression matches the node run
	// on it ("Only build jobs with label expressions matching this node").
	Exclusive bool
}

// CreateNode creates a permanent agent launched by the inbound agent (the
// controller waits for the agent to connect), kept online while connected,
// as the "New node" form of /computer/new does.
func (c *Client) CreateNode(ctx context.Context, s NodeSpec) error {
	mode := "NORMAL"
	if s.Exclusive {
		mode = "EXCLUSIVE"
	}
	form := map[string]any{
		"name":            s.Name,
		"nodeDescription": s.Description,
		"numExecutors":    s.Executors,
		"remoteFS":        s.RemoteFS,
		"labelString":     s.Label,
		"mode":            mode,
		"retentionStrategy": map[string]any{
			"stapler-class": "hudson.slaves.RetentionStrategy$Always",
			"$class":        "hudson.slaves.RetentionStrategy$Always",
		},
		"nodeProperties": map[string]any{"stapler-class-bag": "true"},
		"launcher": map[string]any{
			"stapler-class": "hudson.slaves.JNLPLauncher",
			"$class":        "hudson.slaves.JNLPLauncher",
			"webSocket":     true,
			"workDirSettings": map[string]any{
				"disabled": false, "workDirPath": "", "internalDir": "remoting", "failIfWorkDirIsMissing": false,
			},
		},
	}
	js, err := json.Marshal(form)
	if err != nil {
		return err
	}
	_, err = c.request(ctx, http.MethodPost, "computer/doCreateItem", nil, url.Values{
		"name": {s.Name},
		"type": {"hudson.slaves.DumbSlave"},
		"json": {string(js)},
	})
	if err != nil {
		return fmt.Errorf("creating node %s: %w", s.Name, err)
	}
	return nil
}

// Secret returns the secret an inbound agent connects to node name with:
// the first argument of the node's JNLP file (Jenkins's
// SlaveComputer/jenkins-agent.jnlp.jelly), served as jenkins-agent.jnlp and,
// before Jenkins 2.3xx and still for compatibility, slave-agent.jnlp.
func (c *Client) Secret(ctx context.Context, name string) (string, error) {
	body, err := c.request(ctx, http.MethodGet, nodePath(name)+"jenkins-agent.jnlp", nil, nil)
	if errors.Is(err, ErrNotFound) {
		body, err = c.request(ctx, http.MethodGet, nodePath(name)+"slave-agent.jnlp", nil, nil)
	}
	if err != nil {
		return "", fmt.Errorf("reading the agent secret of node %s: %w", name, err)
	}
	var doc struct {
		Arguments []string `xml:"application-desc>argument"`
	}
	// The file's body is never put in an error: it is the secret.
	if err := xml.Unmarshal(body, &doc); err != nil || len(doc.Arguments) == 0 {
		return "", fmt.Errorf("reading the agent secret of node %s: the JNLP file has no arguments", name)
	}
	secret := doc.Arguments[0]
	if secret == "" || len(secret) > 256 || strings.IndexFunc(secret, func(r rune) bool { return !unicode.IsPrint(r) || unicode.IsSpace(r) }) >= 0 {
		return "", fmt.Errorf("reading the agent secret of node %s: the JNLP file's first argument is not a secret", name)
	}
	return secret, nil
}

// MarkOffline takes node name temporarily offline, so that it accepts no
// new build; the message shows in Jenkins.
func (c *Client) MarkOffline(ctx context.Context, name, message string) error {
	if _, err := c.request(ctx, http.MethodPost, nodePath(name)+"changeOfflineCause", nil, url.Values{"offlineMessage": {message}}); err != nil {
		return fmt.Errorf("taking node %s offline: %w", name, err)
	}
	return nil
}

// ToggleOffline flips node name's temporarily-offline mark; on a node that
// MarkOffline marked, it brings it back.
func (c *Client) ToggleOffline(ctx context.Context, name string) error {
	if _, err := c.request(ctx, http.MethodPost, nodePath(name)+"toggleOffline", nil, url.Values{}); err != nil {
		return fmt.Errorf("bringing node %s back online: %w", name, err)
	}
	return nil
}

// DeleteNode deletes node name; Jenkins ends any build on it, so callers
// make sure first that there is none.
func (c *Client) DeleteNode(ctx context.Context, name string) error {
	if _, err := c.request(ctx, http.MethodPost, nodePath(name)+"doDelete", nil, url.Values{}); err != nil {
		return fmt.Errorf("deleting node %s: %w", name, err)
	}
	return nil
}
