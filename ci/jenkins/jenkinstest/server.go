// Package jenkinstest is a Jenkins controller's REST API for tests: the
// endpoints Hangar's Jenkins watcher and inbound agents use, with Jenkins's
// JSON and XML shapes, HTTP basic auth with a user's API token, CSRF crumbs,
// and a queue that hands builds to the executors of connected nodes.
//
// It mirrors these endpoints of Jenkins core 2.x (its shapes are checked
// against python3-jenkins in this package's tests):
//
//	GET  /, /api/json               the controller (X-Jenkins header on every answer)
//	GET  /me/api/json               the authenticated user
//	GET  /crumbIssuer/api/json      a CSRF crumb (404 when crumbs are off)
//	GET  /queue/api/json            the build queue
//	GET  /computer/api/json         the nodes
//	POST /computer/doCreateItem     name, type, json: a new node (hudson.slaves.DumbSlave)
//	GET  /computer/NAME/api/json    one node
//	GET  /computer/NAME/config.xml  its configuration
//	GET  /computer/NAME/jenkins-agent.jnlp (and slave-agent.jnlp)  its JNLP file, with the secret
//	POST /computer/NAME/changeOfflineCause, /toggleOffline, /doDelete
//	GET  /jnlpJars/agent.jar        the agent jar (no auth), see AgentJar
//	GET  /login                     200, what agent.jar pings (no auth)
//	GET  /wsagents/                 a WebSocket inbound agent's connection (no auth;
//	                                Node-Name and Secret-Key headers)
//
// The ?tree= parameter is honoured; without one, answers have the shape of
// Jenkins's default depth 0 (a queue item's task shows name, url and color;
// a node's executors only their class), and ?depth=1 or more shows all.
//
// A node is online while an agent holds its WebSocket connection open;
// nothing goes over it. A queued build waits with Jenkins's own "why" and
// runs on the first online, not temporarily offline, node with its label
// and a free executor, until the test calls FinishBuild.
package jenkinstest

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"html"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Version is what the X-Jenkins header says.
const Version = "2.462.3"

// Options configure a Server.
type Options struct {
	User  string
	Token string // the user's API token
	// NoCrumbs turns CSRF protection off: no crumb issuer, no crumb needed.
	NoCrumbs bool
	// AgentJar is served as /jnlpJars/agent.jar.
	AgentJar []byte
}

// Server is a running test controller.
type Server struct {
	URL string // root URL, ending in "/"

	opts    Options
	http    *httptest.Server
	key     []byte // for node secrets
	crumb   string
	jarTime time.Time

	mu      sync.Mutex
	nodes   map[string]*node
	order   []string // node names in creation order
	queue   []*item
	nextID  int64
	builds  map[string]int // job → last build number
	hits    map[string]int // "METHOD path" → requests
	hooks   Hooks
	closing bool
}

// Hooks let a test act at the moment something happens, as a busy
// controller might.
type Hooks struct {
	// MarkedOffline runs when a node is taken temporarily offline, before
	// the answer is sent.
	MarkedOffline func(node string)
}

type node struct {
	Node
	conn net.Conn // the agent's WebSocket connection; nil when disconnected
}

// Node is a node as a test sees it.
type Node struct {
	Name        string
	Description string
	Labels      []string
	RemoteFS    string
	Executors   int
	Mode        string // NORMAL | EXCLUSIVE
	Launcher    string // the launcher's class
	WebSocket   bool   // the JNLP launcher's WebSocket option
	Retention   string // the retention strategy's class

	Connected          bool
	TemporarilyOffline bool
	OfflineMessage     string
	Build              string // "JOB #N" running on it, "" when idle

	// AgentArgs are the command-line arguments the last agent that
	// connected reported (the X-Test-Agent-Argv header of the fake
	// agent.jar), and SecretFileMode the permissions of the file it read
	// the secret from ("rw-------"), "" when not from a file.
	AgentArgs      []string
	SecretFileMode string
}

type item struct {
	id       int64
	job      string
	label    string
	pipeline bool
	since    time.Time
}

// New starts a server on 127.0.0.1. Close it when done.
func New(o Options) *Server {
	s := &Server{
		opts:    o,
		key:     randomBytes(32),
		crumb:   hex.EncodeToString(randomBytes(16)),
		jarTime: time.Now().Truncate(time.Second),
		nodes:   map[string]*node{},
		builds:  map[string]int{},
		hits:    map[string]int{},
		nextID:  1,
	}
	s.http = httptest.NewServer(s.handler())
	s.URL = s.http.URL + "/"
	return s
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}

// Close disconnects every agent and stops the server.
func (s *Server) Close() {
	s.mu.Lock()
	s.closing = true
	for _, n := range s.nodes {
		if n.conn != nil {
			_ = n.conn.Close()
		}
	}
	s.mu.Unlock()
	s.http.CloseClientConnections()
	s.http.Close()
}

// SetHooks replaces the hooks.
func (s *Server) SetHooks(h Hooks) {
	s.mu.Lock()
	s.hooks = h
	s.mu.Unlock()
}

// Secret is node name's agent secret, as Jenkins derives it: an HMAC of the
// name under a key of the controller.
func (s *Server) Secret(name string) string {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(name))
	return hex.EncodeToString(m.Sum(nil))
}

// Enqueue queues a build of job that needs label; pipeline makes it look
// like a Pipeline node() step, whose label only its why tells. It returns
// the queue item's id.
func (s *Server) Enqueue(job, label string, pipeline bool) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	it := &item{id: s.nextID, job: job, label: label, pipeline: pipeline, since: time.Now()}
	s.nextID++
	s.queue = append(s.queue, it)
	s.scheduleLocked()
	return it.id
}

// Cancel removes a queued item, as the queue's cancel button does.
func (s *Server) Cancel(id int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = slices.DeleteFunc(s.queue, func(it *item) bool { return it.id == id })
}

// Queued is how many items wait in the queue.
func (s *Server) Queued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

// AddNode creates a node directly, as an administrator would.
func (s *Server) AddNode(n Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addLocked(n)
}

func (s *Server) addLocked(n Node) {
	if n.Executors == 0 {
		n.Executors = 1
	}
	if n.Mode == "" {
		n.Mode = "NORMAL"
	}
	s.nodes[n.Name] = &node{Node: n}
	s.order = append(s.order, n.Name)
}

// Node returns a snapshot of node name.
func (s *Server) Node(name string) (Node, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nodes[name]
	if !ok {
		return Node{}, false
	}
	return n.snapshot(), true
}

func (n *node) snapshot() Node {
	c := n.Node
	c.Labels = slices.Clone(n.Labels)
	c.AgentArgs = slices.Clone(n.AgentArgs)
	return c
}

// Nodes lists every node but the built-in one, in creation order.
func (s *Server) Nodes() []Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Node
	for _, name := range s.order {
		out = append(out, s.nodes[name].snapshot())
	}
	return out
}

// StartBuild starts a build of job on node name, whatever its state, as a
// build that Jenkins handed the node a moment ago.
func (s *Server) StartBuild(name, job string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nodes[name]
	if !ok || n.Build != "" {
		return false
	}
	s.startLocked(n, job)
	return true
}

func (s *Server) startLocked(n *node, job string) {
	s.builds[job]++
	n.Build = fmt.Sprintf("%s #%d", job, s.builds[job])
}

// FinishBuild ends the build running on node name and gives the node the
// next build that waits for it.
func (s *Server) FinishBuild(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nodes[name]
	if !ok || n.Build == "" {
		return false
	}
	n.Build = ""
	s.scheduleLocked()
	return true
}

// Disconnect drops node name's agent connection, as a crashed agent would.
func (s *Server) Disconnect(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n, ok := s.nodes[name]; ok && n.conn != nil {
		_ = n.conn.Close()
	}
}

// Hits is how many requests "METHOD /path" had, such as "GET /queue/api/json".
func (s *Server) Hits(methodPath string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[methodPath]
}

// scheduleLocked hands queued builds to free executors, in queue order.
func (s *Server) scheduleLocked() {
	s.queue = slices.DeleteFunc(s.queue, func(it *item) bool {
		for _, name := range s.order {
			n := s.nodes[name]
			if n.Connected && !n.TemporarilyOffline && n.Build == "" && slices.Contains(n.Labels, it.label) {
				s.startLocked(n, it.job)
				return true
			}
		}
		return false
	})
}

// why is Jenkins's reason for an item waiting for a label
// (hudson.model.queue.CauseOfBlockage.BecauseLabelIsOffline and
// BecauseLabelIsBusy, core's Messages.properties).
func (s *Server) whyLocked(it *item) string {
	exists, online := false, false
	for _, n := range s.nodes {
		if slices.Contains(n.Labels, it.label) {
			exists = true
			online = online || n.Connected && !n.TemporarilyOffline
		}
	}
	switch {
	case !exists:
		return "There are no nodes with the label ‘" + it.label + "’"
	case !online:
		return "All nodes of label ‘" + it.label + "’ are offline"
	default:
		return "Waiting for next available executor on ‘" + it.label + "’"
	}
}

func (s *Server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.auth(s.root))
	mux.HandleFunc("GET /api/json", s.auth(s.rootJSON))
	mux.HandleFunc("GET /me/api/json", s.auth(s.me))
	mux.HandleFunc("GET /crumbIssuer/api/json", s.auth(s.crumbIssuer))
	mux.HandleFunc("GET /queue/api/json", s.auth(s.queueJSON))
	mux.HandleFunc("GET /computer/{$}", s.auth(s.page("Nodes")))
	mux.HandleFunc("GET /computer/api/json", s.auth(s.computersJSON))
	mux.HandleFunc("/computer/doCreateItem", s.auth(s.post(s.createItem)))
	mux.HandleFunc("GET /computer/{name}/{$}", s.auth(s.computerPage))
	mux.HandleFunc("GET /computer/{name}/api/json", s.auth(s.computerJSON))
	mux.HandleFunc("GET /computer/{name}/config.xml", s.auth(s.configXML))
	mux.HandleFunc("GET /computer/{name}/jenkins-agent.jnlp", s.auth(s.jnlp))
	mux.HandleFunc("GET /computer/{name}/slave-agent.jnlp", s.auth(s.jnlp))
	mux.HandleFunc("/computer/{name}/changeOfflineCause", s.auth(s.post(s.changeOfflineCause)))
	mux.HandleFunc("/computer/{name}/toggleOffline", s.auth(s.post(s.toggleOffline)))
	mux.HandleFunc("/computer/{name}/doDelete", s.auth(s.post(s.doDelete)))
	// Always readable, as in Jenkins: what an agent needs before it has
	// any credential but its secret.
	mux.HandleFunc("GET /jnlpJars/agent.jar", s.agentJar)
	mux.HandleFunc("GET /login", s.page("Sign in [Jenkins]"))
	mux.HandleFunc("GET /wsagents/{$}", s.wsagents)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.hits[r.Method+" "+r.URL.Path]++
		s.mu.Unlock()
		w.Header().Set("X-Jenkins", Version)
		w.Header().Set("X-Hudson", "1.395")
		mux.ServeHTTP(w, r)
	})
}

// fail answers with an error page the way Jenkins does: the reason is the
// title.
func fail(w http.ResponseWriter, status int, reason string) {
	w.Header().Set("Content-Type", "text/html;charset=utf-8")
	w.WriteHeader(status)
	r := html.EscapeString(reason)
	_, _ = fmt.Fprintf(w, "<html><head><title>Error %d %s</title></head><body><h2>HTTP ERROR %d %s</h2></body></html>\n", status, r, status, r)
}

// auth admits the user with its API token. Like Jenkins, a wrong token is
// 401 and no credentials at all 403, anonymous having no Overall/Read.
func (s *Server) auth(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		user, token, ok := r.BasicAuth()
		switch {
		case !ok:
			w.Header().Set("X-You-Are-Authenticated-As", "anonymous")
			w.Header().Set("X-Required-Permission", "hudson.model.Hudson.Read")
			fail(w, http.StatusForbidden, "Authentication required")
		case user != s.opts.User || subtle.ConstantTimeCompare([]byte(token), []byte(s.opts.Token)) != 1:
			w.Header().Set("WWW-Authenticate", `Basic realm="Jenkins"`)
			fail(w, http.StatusUnauthorized, "Invalid password/token for user: "+user)
		default:
			next(w, r)
		}
	}
}

// post refuses what is not a POST, and a POST without the crumb.
func (s *Server) post(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			fail(w, http.StatusMethodNotAllowed, "This URL requires POST")
			return
		}
		if !s.opts.NoCrumbs && r.Header.Get("Jenkins-Crumb") != s.crumb {
			fail(w, http.StatusForbidden, "No valid crumb was included in the request")
			return
		}
		next(w, r)
	}
}

func (s *Server) page(title string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html;charset=utf-8")
		_, _ = fmt.Fprintf(w, "<html><head><title>%s</title></head><body></body></html>\n", html.EscapeString(title))
	}
}

func (s *Server) root(w http.ResponseWriter, r *http.Request) {
	s.page("Dashboard [Jenkins]")(w, r)
}

// writeJSON answers with v pruned by the request's tree, else by def, the
// shape of Jenkins's default depth (ignored when ?depth= is 1 or more).
func writeJSON(w http.ResponseWriter, r *http.Request, v any, def string) {
	spec := def
	if d, _ := strconv.Atoi(r.URL.Query().Get("depth")); d > 0 {
		spec = all
	}
	if q := r.URL.Query().Get("tree"); q != "" {
		spec = q
	}
	t, err := parseTree(spec)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json;charset=utf-8")
	// The fake's own maps always encode; a failed write is a client gone.
	_ = json.NewEncoder(w).Encode(prune(v, t))
}

func (s *Server) rootJSON(w http.ResponseWriter, r *http.Request) {
	v := map[string]any{
		"_class":          "hudson.model.Hudson",
		"assignedLabels":  []any{map[string]any{"name": "built-in"}},
		"mode":            "NORMAL",
		"nodeDescription": "the Jenkins controller's built-in node",
		"nodeName":        "",
		"numExecutors":    0,
		"description":     nil,
		"jobs":            []any{},
		"quietingDown":    false,
		"slaveAgentPort":  -1,
		"url":             s.URL,
		"useCrumbs":       !s.opts.NoCrumbs,
		"useSecurity":     true,
		"views":           []any{map[string]any{"_class": "hudson.model.AllView", "name": "all", "url": s.URL}},
	}
	writeJSON(w, r, v, all)
}

func (s *Server) me(w http.ResponseWriter, r *http.Request) {
	user, _, _ := r.BasicAuth()
	writeJSON(w, r, map[string]any{
		"_class":      "hudson.model.User",
		"absoluteUrl": s.URL + "user/" + url.PathEscape(user),
		"description": nil,
		"fullName":    user,
		"id":          user,
		"property":    []any{},
	}, all)
}

func (s *Server) crumbIssuer(w http.ResponseWriter, r *http.Request) {
	if s.opts.NoCrumbs {
		fail(w, http.StatusNotFound, "Not Found")
		return
	}
	writeJSON(w, r, map[string]any{
		"_class":            "hudson.security.csrf.DefaultCrumbIssuer",
		"crumb":             s.crumb,
		"crumbRequestField": "Jenkins-Crumb",
	}, all)
}

func (s *Server) queueJSON(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	items := []any{}
	for _, it := range s.queue {
		ms := it.since.UnixMilli()
		task := map[string]any{
			"_class":          "hudson.model.FreeStyleProject",
			"name":            it.job,
			"url":             s.URL + "job/" + url.PathEscape(it.job) + "/",
			"color":           "notbuilt",
			"labelExpression": it.label,
		}
		if it.pipeline {
			task = map[string]any{"_class": "org.jenkinsci.plugins.workflow.support.steps.ExecutorStepExecution$PlaceholderTask"}
		}
		items = append(items, map[string]any{
			"_class": "hudson.model.Queue$BuildableItem",
			"actions": []any{map[string]any{
				"_class": "hudson.model.CauseAction",
				"causes": []any{map[string]any{"_class": "hudson.model.Cause$UserIdCause", "shortDescription": "Started by user " + s.opts.User, "userId": s.opts.User, "userName": s.opts.User}},
			}},
			"blocked":                    false,
			"buildable":                  true,
			"id":                         it.id,
			"inQueueSince":               ms,
			"params":                     "",
			"stuck":                      false,
			"task":                       task,
			"url":                        "queue/item/" + strconv.FormatInt(it.id, 10) + "/",
			"why":                        s.whyLocked(it),
			"buildableStartMilliseconds": ms,
			"pending":                    false,
		})
	}
	s.mu.Unlock()
	v := map[string]any{"_class": "hudson.model.Queue", "discoverableItems": []any{}, "items": items}
	writeJSON(w, r, v, "discoverableItems,items[*,task[name,url,color]]")
}

// computerJSONLocked is a node's full remote-API object.
func (s *Server) computerJSONLocked(n *node) map[string]any {
	labels := []any{}
	for _, l := range append(slices.Clone(n.Labels), n.Name) {
		labels = append(labels, map[string]any{"name": l})
	}
	executors := []any{}
	for i := range n.Executors {
		e := map[string]any{"currentExecutable": nil, "idle": true, "likelyStuck": false, "number": i, "progress": -1}
		if i == 0 && n.Build != "" {
			job, num, _ := strings.Cut(n.Build, " #")
			e["currentExecutable"] = map[string]any{
				"_class": "hudson.model.FreeStyleBuild",
				"number": mustAtoi(num),
				"url":    s.URL + "job/" + url.PathEscape(job) + "/" + num + "/",
			}
			e["idle"], e["progress"] = false, 10
		}
		executors = append(executors, e)
	}
	var cause any
	reason := ""
	switch {
	case n.TemporarilyOffline:
		reason = n.OfflineMessage
		cause = map[string]any{"_class": "hudson.slaves.OfflineCause$UserCause", "description": "Disconnected by " + s.opts.User + " : " + reason}
	case !n.Connected:
		cause = nil
	}
	return map[string]any{
		"_class":              "hudson.slaves.SlaveComputer",
		"actions":             []any{},
		"assignedLabels":      labels,
		"description":         n.Description,
		"displayName":         n.Name,
		"executors":           executors,
		"icon":                "symbol-computer",
		"iconClassName":       "symbol-computer",
		"idle":                n.Build == "",
		"jnlpAgent":           true,
		"launchSupported":     false,
		"loadStatistics":      map[string]any{"_class": "hudson.model.Label$1"},
		"manualLaunchAllowed": true,
		"monitorData":         map[string]any{},
		"numExecutors":        n.Executors,
		"offline":             !n.Connected || n.TemporarilyOffline,
		"offlineCause":        cause,
		"offlineCauseReason":  reason,
		"oneOffExecutors":     []any{},
		"temporarilyOffline":  n.TemporarilyOffline,
		"absoluteRemotePath":  nil,
	}
}

func mustAtoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// depth 0: a computer's executors and labels show their class only, or in
// their case nothing at all.
const computerDepth0 = "*,assignedLabels[name],executors,oneOffExecutors,loadStatistics"

// builtInJSON is the controller's own node, which has no executors here.
func builtInJSON() map[string]any {
	return map[string]any{
		"_class":             "hudson.model.Hudson$MasterComputer",
		"actions":            []any{},
		"assignedLabels":     []any{map[string]any{"name": "built-in"}},
		"description":        "the Jenkins controller's built-in node",
		"displayName":        "Built-In Node",
		"executors":          []any{},
		"idle":               true,
		"jnlpAgent":          false,
		"numExecutors":       0,
		"offline":            false,
		"offlineCause":       nil,
		"offlineCauseReason": "",
		"oneOffExecutors":    []any{},
		"temporarilyOffline": false,
	}
}

func (s *Server) computersJSON(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	computers := []any{builtInJSON()}
	busy, total := 0, 0
	for _, name := range s.order {
		n := s.nodes[name]
		computers = append(computers, s.computerJSONLocked(n))
		total += n.Executors
		if n.Build != "" {
			busy++
		}
	}
	s.mu.Unlock()
	v := map[string]any{"_class": "hudson.model.ComputerSet", "busyExecutors": busy, "computer": computers, "displayName": "Nodes", "totalExecutors": total}
	writeJSON(w, r, v, "*,computer["+computerDepth0+"]")
}

// lookup finds the node of the request's path, or answers 404.
func (s *Server) lookup(w http.ResponseWriter, r *http.Request) *node {
	n, ok := s.nodes[r.PathValue("name")]
	if !ok {
		fail(w, http.StatusNotFound, "Not Found")
		return nil
	}
	return n
}

func (s *Server) computerPage(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	n := s.lookup(w, r)
	s.mu.Unlock()
	if n != nil {
		s.page(r.PathValue("name")+" [Jenkins]")(w, r)
	}
}

func (s *Server) computerJSON(w http.ResponseWriter, r *http.Request) {
	// The built-in node's URL name, as Jenkins.getComputer knows it.
	if name := r.PathValue("name"); name == "(built-in)" || name == "(master)" {
		writeJSON(w, r, builtInJSON(), computerDepth0)
		return
	}
	s.mu.Lock()
	n := s.lookup(w, r)
	var v map[string]any
	if n != nil {
		v = s.computerJSONLocked(n)
	}
	s.mu.Unlock()
	if n != nil {
		writeJSON(w, r, v, computerDepth0)
	}
}

// createItem is ComputerSet.doDoCreateItem: the "json" form field is the
// node's form as the "New node" page submits it.
func (s *Server) createItem(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	name := strings.TrimSpace(r.Form.Get("name"))
	typ := r.Form.Get("type")
	var form struct {
		NodeDescription string `json:"nodeDescription"`
		NumExecutors    any    `json:"numExecutors"` // a number, or a string from the HTML form
		RemoteFS        string `json:"remoteFS"`
		LabelString     string `json:"labelString"`
		Mode            string `json:"mode"`
		Retention       struct {
			Class string `json:"stapler-class"`
		} `json:"retentionStrategy"`
		Launcher struct {
			Class     string `json:"stapler-class"`
			WebSocket bool   `json:"webSocket"`
		} `json:"launcher"`
	}
	switch {
	case name == "":
		fail(w, http.StatusBadRequest, "Query parameter 'name' is required")
		return
	case strings.ContainsAny(name, `?*/\%!@#$^&|<>[]:;`) || name == "." || name == "..":
		fail(w, http.StatusBadRequest, fmt.Sprintf("‘%s’ is an unsafe character", name))
		return
	case typ != "hudson.slaves.DumbSlave" && typ != "hudson.slaves.DumbSlave$DescriptorImpl":
		fail(w, http.StatusBadRequest, "unknown node type "+typ)
		return
	}
	if err := json.Unmarshal([]byte(r.Form.Get("json")), &form); err != nil {
		fail(w, http.StatusBadRequest, "bad json form: "+err.Error())
		return
	}
	executors, err := strconv.Atoi(fmt.Sprint(form.NumExecutors))
	if err != nil || executors < 1 {
		fail(w, http.StatusBadRequest, "Invalid agent configuration. Number of executors must be a positive integer")
		return
	}
	if form.Mode != "NORMAL" && form.Mode != "EXCLUSIVE" {
		fail(w, http.StatusBadRequest, "bad mode "+form.Mode)
		return
	}
	if form.Launcher.Class == "" {
		fail(w, http.StatusBadRequest, "no launcher stapler-class")
		return
	}
	s.mu.Lock()
	if _, dup := s.nodes[name]; dup {
		s.mu.Unlock()
		fail(w, http.StatusBadRequest, "Agent called ‘"+name+"’ already exists")
		return
	}
	s.addLocked(Node{
		Name: name, Description: form.NodeDescription, Labels: strings.Fields(form.LabelString), RemoteFS: form.RemoteFS,
		Executors: executors, Mode: form.Mode, Launcher: form.Launcher.Class, WebSocket: form.Launcher.WebSocket,
		Retention: form.Retention.Class,
	})
	s.mu.Unlock()
	http.Redirect(w, r, s.URL+"computer/", http.StatusFound)
}

// configXML is the node as XStream writes a hudson.slaves.DumbSlave.
func (s *Server) configXML(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	n := s.lookup(w, r)
	var c Node
	if n != nil {
		c = n.snapshot()
	}
	s.mu.Unlock()
	if n == nil {
		return
	}
	x := func(v string) string {
		var b strings.Builder
		_ = xml.EscapeText(&b, []byte(v)) // a strings.Builder does not fail
		return b.String()
	}
	w.Header().Set("Content-Type", "application/xml")
	_, _ = fmt.Fprintf(w, `<?xml version="1.1" encoding="UTF-8"?>
<slave>
  <name>%s</name>
  <description>%s</description>
  <remoteFS>%s</remoteFS>
  <numExecutors>%d</numExecutors>
  <mode>%s</mode>
  <retentionStrategy class="%s"/>
  <launcher class="%s">
    <workDirSettings>
      <disabled>false</disabled>
      <internalDir>remoting</internalDir>
      <failIfWorkDirIsMissing>false</failIfWorkDirIsMissing>
    </workDirSettings>
    <webSocket>%t</webSocket>
  </launcher>
  <label>%s</label>
  <nodeProperties/>
</slave>
`, x(c.Name), x(c.Description), x(c.RemoteFS), c.Executors, c.Mode, x(c.Retention), x(c.Launcher), c.WebSocket, x(strings.Join(c.Labels, " ")))
}

// jnlp is SlaveComputer/jenkins-agent.jnlp.jelly: the secret and the name,
// then the options of the node's launcher.
func (s *Server) jnlp(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	n := s.lookup(w, r)
	var c Node
	if n != nil {
		c = n.snapshot()
	}
	s.mu.Unlock()
	if n == nil {
		return
	}
	args := []string{s.Secret(c.Name), c.Name}
	if c.WebSocket {
		args = append(args, "-webSocket")
	}
	args = append(args, "-workDir", c.RemoteFS, "-internalDir", "remoting", "-url", s.URL)
	var b strings.Builder
	b.WriteString("<jnlp><application-desc>")
	for _, a := range args {
		b.WriteString("<argument>")
		_ = xml.EscapeText(&b, []byte(a)) // a strings.Builder does not fail
		b.WriteString("</argument>")
	}
	b.WriteString("</application-desc></jnlp>")
	w.Header().Set("Content-Type", "application/x-java-jnlp-file")
	_, _ = io.WriteString(w, b.String())
}

func (s *Server) changeOfflineCause(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	s.mu.Lock()
	n := s.lookup(w, r)
	hook := s.hooks.MarkedOffline
	s.mu.Unlock()
	if n == nil {
		return
	}
	if hook != nil {
		hook(name)
	}
	s.mu.Lock()
	n.TemporarilyOffline = true
	n.OfflineMessage = strings.TrimSpace(r.FormValue("offlineMessage"))
	s.mu.Unlock()
	http.Redirect(w, r, s.URL+"computer/"+url.PathEscape(name)+"/", http.StatusFound)
}

func (s *Server) toggleOffline(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	n := s.lookup(w, r)
	if n != nil {
		n.TemporarilyOffline = !n.TemporarilyOffline
		n.OfflineMessage = ""
		if n.TemporarilyOffline {
			n.OfflineMessage = strings.TrimSpace(r.FormValue("offlineMessage"))
		}
		s.scheduleLocked()
	}
	s.mu.Unlock()
	if n != nil {
		http.Redirect(w, r, s.URL+"computer/"+url.PathEscape(r.PathValue("name"))+"/", http.StatusFound)
	}
}

// doDelete removes the node; like Jenkins, it ends a build running on it.
func (s *Server) doDelete(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	n := s.lookup(w, r)
	if n != nil {
		delete(s.nodes, n.Name)
		s.order = slices.DeleteFunc(s.order, func(x string) bool { return x == n.Name })
		if n.conn != nil {
			_ = n.conn.Close()
		}
	}
	s.mu.Unlock()
	if n != nil {
		http.Redirect(w, r, s.URL+"computer/", http.StatusFound)
	}
}

func (s *Server) agentJar(w http.ResponseWriter, r *http.Request) {
	if s.opts.AgentJar == nil {
		fail(w, http.StatusNotFound, "Not Found")
		return
	}
	w.Header().Set("Content-Type", "application/java-archive")
	http.ServeContent(w, r, "agent.jar", s.jarTime, strings.NewReader(string(s.opts.AgentJar)))
}

// wsagents is jenkins.agents.WebSocketAgents: it checks the agent's name and
// secret, answers the WebSocket handshake and keeps the node online for as
// long as the connection lasts. Nothing is sent over it.
func (s *Server) wsagents(w http.ResponseWriter, r *http.Request) {
	name, secret, capability := r.Header.Get("Node-Name"), r.Header.Get("Secret-Key"), r.Header.Get("X-Remoting-Capability")
	if name == "" || secret == "" || capability == "" {
		fail(w, http.StatusBadRequest, "This endpoint is only for use from agent.jar in WebSocket mode")
		return
	}
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || r.Header.Get("Sec-WebSocket-Version") != "13" || r.Header.Get("Sec-WebSocket-Key") == "" {
		fail(w, http.StatusBadRequest, "not a WebSocket handshake")
		return
	}
	var args []string
	if a := r.Header.Get("X-Test-Agent-Argv"); a != "" {
		b, err := base64.StdEncoding.DecodeString(a)
		if err != nil {
			fail(w, http.StatusBadRequest, "bad X-Test-Agent-Argv")
			return
		}
		args = strings.Split(string(b), "\x00")
	}
	s.mu.Lock()
	n, ok := s.nodes[name]
	switch {
	case !ok:
		s.mu.Unlock()
		fail(w, http.StatusBadRequest, "no such agent")
		return
	case subtle.ConstantTimeCompare([]byte(secret), []byte(s.Secret(name))) != 1:
		s.mu.Unlock()
		fail(w, http.StatusForbidden, "Forbidden")
		return
	case n.conn != nil:
		s.mu.Unlock()
		fail(w, http.StatusBadRequest, "Agent "+name+" is already connected to this controller. Rejecting this connection.")
		return
	case s.closing:
		s.mu.Unlock()
		fail(w, http.StatusServiceUnavailable, "Jenkins is going to shut down")
		return
	}
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		s.mu.Unlock()
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	sum := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	_, _ = fmt.Fprintf(rw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"+
		"X-Remoting-Capability: %s\r\nConnection-Cookie: %s\r\nX-Jenkins: %s\r\n\r\n",
		base64.StdEncoding.EncodeToString(sum[:]), capability, hex.EncodeToString(randomBytes(16)), Version)
	if err := rw.Flush(); err != nil {
		s.mu.Unlock()
		_ = conn.Close()
		return
	}
	n.conn, n.Connected = conn, true
	n.AgentArgs, n.SecretFileMode = args, r.Header.Get("X-Test-Secret-File-Mode")
	s.scheduleLocked()
	s.mu.Unlock()

	// The agent's frames are not read as frames: the connection lasts until
	// either end closes it.
	_, _ = io.Copy(io.Discard, rw)
	_ = conn.Close()
	s.mu.Lock()
	if n.conn == conn {
		n.conn, n.Connected = nil, false
	}
	s.mu.Unlock()
}

// Agent is an inbound agent connection a test opened with Connect.
type Agent struct {
	conn net.Conn
}

// Close disconnects the agent; its node goes offline.
func (a *Agent) Close() { _ = a.conn.Close() }

// Connect connects to node name as an inbound WebSocket agent with secret,
// doing what agent.jar does: the handshake on /wsagents/ with the agent's
// headers. It returns the HTTP status when the server refuses.
func (s *Server) Connect(name, secret string) (*Agent, int, error) {
	conn, err := net.Dial("tcp", s.http.Listener.Addr().String())
	if err != nil {
		return nil, 0, err
	}
	key := base64.StdEncoding.EncodeToString(randomBytes(16))
	if _, err := fmt.Fprintf(conn, "GET /wsagents/ HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"+
		"Sec-WebSocket-Version: 13\r\nNode-Name: %s\r\nSecret-Key: %s\r\nX-Remoting-Capability: test\r\n\r\n",
		s.http.Listener.Addr(), key, name, secret); err != nil {
		_ = conn.Close()
		return nil, 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		_ = conn.Close()
		return nil, 0, err
	}
	// A 101's body is empty (http.NoBody); a refusal's is read from conn,
	// closed before it on the way out.
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		_ = conn.Close()
		return nil, resp.StatusCode, fmt.Errorf("connecting agent %s: %s", name, resp.Status)
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		_ = conn.Close()
		return nil, 0, fmt.Errorf("connecting agent %s: bad Sec-WebSocket-Accept", name)
	}
	// The server keeps its lock from the handshake until the node is
	// online: whatever the test asks next sees it online.
	return &Agent{conn: conn}, resp.StatusCode, nil
}
