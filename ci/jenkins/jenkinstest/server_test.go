package jenkinstest

import (
	"net/http"
	"reflect"
	"strings"
	"testing"
)

const (
	testUser  = "hangar"
	testToken = "11aa22bb33cc44dd55ee66ff77889900aa"
)

// python3-jenkins, a client written against real controllers, drives the
// test server through a node's life and reads the queue; what it gets back
// must be what it expects of Jenkins.
func TestPythonJenkinsClient(t *testing.T) {
	s := New(Options{User: testUser, Token: testToken})
	defer s.Close()
	s.Enqueue("freestyle-job", "linux", false)
	s.Enqueue("pipeline-job", "py-label", true)

	got := s.Python(t, `
out = {}
out['whoami'] = server.get_whoami()['id']
out['version'] = server.get_version()
server.create_node('py-node', numExecutors=1, nodeDescription='made by python', remoteFS='/srv/agent',
                   labels='py-label other', exclusive=True, launcher=jenkins.LAUNCHER_JNLP,
                   launcher_params={'webSocket': True})
out['exists'] = server.node_exists('py-node')
out['missing'] = server.node_exists('no-such-node')
info = server.get_node_info('py-node')
out['info'] = {k: info[k] for k in ('displayName', 'description', 'numExecutors', 'offline', 'temporarilyOffline', 'idle', 'jnlpAgent')}
out['labels'] = sorted(l['name'] for l in info['assignedLabels'])
import xml.etree.ElementTree as ET
cfg = ET.fromstring(server.get_node_config('py-node'))
out['config'] = {'label': cfg.findtext('label'), 'remoteFS': cfg.findtext('remoteFS'), 'mode': cfg.findtext('mode'),
                 'launcher': cfg.find('launcher').get('class'), 'webSocket': cfg.findtext('launcher/webSocket')}
out['queue'] = [{'why': i['why'], 'buildable': i['buildable'], 'task': i['task'].get('name'), 'id': i['id']} for i in server.get_queue_info()]
out['nodes'] = server.get_nodes()
server.delete_node('py-node')
out['deleted'] = not server.node_exists('py-node')
try:
    jenkins.Jenkins(os.environ['JENKINS_URL'], username='hangar', password='wrong').get_whoami()
except jenkins.JenkinsException as e:
    out['bad_token'] = str(e)
print(json.dumps(out))
`)
	want := map[string]any{
		"whoami":  testUser,
		"version": Version,
		"exists":  true,
		"missing": false,
		"info":    map[string]any{"displayName": "py-node", "description": "made by python", "numExecutors": 1.0, "offline": true, "temporarilyOffline": false, "idle": true, "jnlpAgent": true},
		"labels":  []any{"other", "py-label", "py-node"},
		"config":  map[string]any{"label": "py-label other", "remoteFS": "/srv/agent", "mode": "EXCLUSIVE", "launcher": "hudson.slaves.JNLPLauncher", "webSocket": "true"},
		"deleted": true,
		"queue": []any{
			map[string]any{"why": "There are no nodes with the label ‘linux’", "buildable": true, "task": "freestyle-job", "id": 1.0},
			// A Pipeline step's task has no name at depth 0; its why names
			// the label, and python-jenkins made the node that has it.
			map[string]any{"why": "All nodes of label ‘py-label’ are offline", "buildable": true, "task": nil, "id": 2.0},
		},
		"nodes": []any{
			map[string]any{"name": "Built-In Node", "offline": false},
			map[string]any{"name": "py-node", "offline": true},
		},
	}
	bad, _ := got["bad_token"].(string)
	delete(got, "bad_token")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("python3-jenkins saw:\n%v\nwant:\n%v", got, want)
	}
	if !strings.Contains(bad, "[401]") || !strings.Contains(bad, "Invalid password/token for user: hangar") {
		t.Errorf("wrong token: python3-jenkins said %q, want a 401 naming the user", bad)
	}
	if strings.Contains(bad, testToken) {
		t.Error("the error shows the token")
	}
}

// A build on a node shows where python3-jenkins's get_running_builds looks
// for it: the node's executors at depth 2. (That call itself stops at the
// built-in node on Jenkins 2.307 and later, which renamed it; this server
// does the same, so it is not called.)
func TestPythonRunningBuild(t *testing.T) {
	s := New(Options{User: testUser, Token: testToken, NoCrumbs: true})
	defer s.Close()
	s.AddNode(Node{Name: "busy-node", Labels: []string{"x"}, RemoteFS: "/r", Launcher: "hudson.slaves.JNLPLauncher"})
	if !s.StartBuild("busy-node", "deploy") {
		t.Fatal("StartBuild failed")
	}
	got := s.Python(t, `
info = server.get_node_info('busy-node', depth=2)
e = info['executors'][0]
print(json.dumps({'idle': info['idle'], 'number': e['number'], 'build': e['currentExecutable'],
                  'builtin': server.get_node_info('(built-in)')['displayName']}))`)
	want := map[string]any{
		"idle": false, "number": 0.0, "builtin": "Built-In Node",
		"build": map[string]any{"_class": "hudson.model.FreeStyleBuild", "number": 1.0, "url": s.URL + "job/deploy/1/"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("python3-jenkins saw %v, want %v", got, want)
	}
}

func TestAuth(t *testing.T) {
	s := New(Options{User: testUser, Token: testToken})
	defer s.Close()
	tests := []struct {
		name       string
		user, pass string
		method     string
		path       string
		status     int
	}{
		{"anonymous", "", "", "GET", "queue/api/json", http.StatusForbidden},
		{"wrong token", testUser, "nope", "GET", "queue/api/json", http.StatusUnauthorized},
		{"wrong user", "other", testToken, "GET", "queue/api/json", http.StatusUnauthorized},
		{"right token", testUser, testToken, "GET", "queue/api/json", http.StatusOK},
		{"post without crumb", testUser, testToken, "POST", "computer/doCreateItem", http.StatusForbidden},
		{"get of a post-only action", testUser, testToken, "GET", "computer/doCreateItem", http.StatusMethodNotAllowed},
		{"login needs no auth", "", "", "GET", "login", http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, s.URL+tt.path, nil)
			if tt.user != "" {
				req.SetBasicAuth(tt.user, tt.pass)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			_ = resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Errorf("%s %s = %d, want %d", tt.method, tt.path, resp.StatusCode, tt.status)
			}
			if resp.Header.Get("X-Jenkins") != Version {
				t.Errorf("X-Jenkins = %q", resp.Header.Get("X-Jenkins"))
			}
		})
	}
}

func TestParseTree(t *testing.T) {
	tests := []struct {
		in   string
		want tree
	}{
		{"id", tree{"id": nil}},
		{"items[id,task[name,url]],x", tree{"items": {"id": nil, "task": {"name": nil, "url": nil}}, "x": nil}},
		{"computer[displayName,executors[idle]]", tree{"computer": {"displayName": nil, "executors": {"idle": nil}}}},
	}
	for _, tt := range tests {
		got, err := parseTree(tt.in)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("parseTree(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"a[b", "a]b"} {
		if _, err := parseTree(bad); err == nil {
			t.Errorf("parseTree(%q) succeeded", bad)
		}
	}
}
