package api

import (
	_ "embed" // the OpenAPI document
	"net/http"
	"slices"
	"strconv"
)

// openAPI is the API's contract, an OpenAPI 3.1 document: every route, its
// parameters, bodies and answers. A test sends real requests through a
// validator made from it, so the document cannot drift from the code.
//
//go:embed openapi.yaml
var openAPI []byte

// OpenAPI returns the OpenAPI document of the API (YAML).
func OpenAPI() []byte { return slices.Clone(openAPI) }

// serveOpenAPI answers GET /v1/openapi.yaml. It needs no token: it is
// documentation, and the same as the project's own file.
func serveOpenAPI(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "application/yaml")
	h.Set("Content-Length", strconv.Itoa(len(openAPI)))
	_, _ = w.Write(openAPI) // a failed write is a client gone
}

// routeMux is the ServeMux Handler builds on; it notes each pattern it is
// given, so that Routes can list them.
type routeMux struct {
	*http.ServeMux
	patterns []string
}

func (m *routeMux) Handle(pattern string, h http.Handler) {
	m.ServeMux.Handle(pattern, h)
	m.patterns = append(m.patterns, pattern)
}

func (m *routeMux) HandleFunc(pattern string, f func(http.ResponseWriter, *http.Request)) {
	m.Handle(pattern, http.HandlerFunc(f))
}

// Routes lists the patterns Handler serves, as http.ServeMux reads them:
// "GET /v1/leases/{id}", … and "/v1/" for the API's not-found answer. A
// test holds them against the OpenAPI document.
func (s *Server) Routes() []string { return s.mux().patterns }
