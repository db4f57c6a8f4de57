"""Tasks on the embedded synthetic datasets (no downloads; see pali.data.synthetic)."""
from pali.data import preprocessors as pp
from pali.data import synthetic
from tasks.common import TAIL, add_mixture, add_task

add_task("synthetic_shapes_caption", synthetic.shapes_source(),
         [synthetic.render_shapes, pp.caption, pp.prepare_images, *TAIL])
