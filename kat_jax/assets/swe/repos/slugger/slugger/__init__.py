from slugger.text import slugify
